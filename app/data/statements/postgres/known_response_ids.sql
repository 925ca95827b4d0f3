-- Which of these response ids exist (a refused ranking names unknown and foreign ones apart).
SELECT id FROM responses WHERE id = ANY(%(ids)s)

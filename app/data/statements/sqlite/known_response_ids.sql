-- Which of these response ids (a JSON array) exist: a refused ranking names unknown and foreign ones apart.
SELECT id FROM responses WHERE id IN (SELECT value FROM json_each(:ids))

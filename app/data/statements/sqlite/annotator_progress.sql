-- The annotator's judgement counts (kept by a trigger on annotations, migration 0014): no row yet
-- for an annotator who has made no judgement.
SELECT judged_total, judged_day, judged_on_day
FROM annotator_progress
WHERE user_id = :user_id

-- The oldest ordinary task from id floor on with a free slot that this annotator has not seen (an
-- expired assignment of theirs does not count as seen). Walks ix_tasks_claimable in id order.
SELECT t.id AS task_id FROM tasks t
WHERE t.status = 'open' AND t.claimed_count < t.required_annotations AND t.is_gold = false
  AND t.kind IN (SELECT value FROM json_each(:kinds))
  AND t.id >= :floor
  AND NOT EXISTS (
    SELECT 1 FROM assignments a
    WHERE a.task_id = t.id AND a.user_id = :user_id AND a.status <> 'expired'
  )
ORDER BY t.id LIMIT 1

-- The task this annotator holds, its deadline pushed (a page reload, a second tab, a retry).
-- kinds is a JSON array of task kinds.
UPDATE assignments SET expires_at = :expires_at
WHERE id = (
    SELECT a.id FROM assignments a JOIN tasks t ON t.id = a.task_id
    WHERE a.user_id = :user_id AND a.status = 'active' AND t.status = 'open'
      AND t.kind IN (SELECT value FROM json_each(:kinds))
    ORDER BY a.id LIMIT 1
)
RETURNING task_id

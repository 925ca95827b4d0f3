-- The task this annotator holds, its deadline pushed, with its prompt and responses in shown order.
-- No rows: they hold none.
WITH resumed AS (
    UPDATE assignments SET expires_at = %(expires_at)s
    WHERE id = (
        SELECT a.id FROM assignments a JOIN tasks t ON t.id = a.task_id
        WHERE a.user_id = %(user_id)s AND a.status = 'active' AND t.status = 'open'
          AND t.kind = ANY(%(kinds)s)
        ORDER BY a.id LIMIT 1
    )
    RETURNING task_id
)
SELECT c.task_id, t.kind, t.prompt_id, p.messages, tr.position,
       r.id AS response_id, r.text
FROM resumed c
JOIN tasks t ON t.id = c.task_id
JOIN prompts p ON p.id = t.prompt_id
JOIN task_responses tr ON tr.task_id = t.id
JOIN responses r ON r.id = tr.response_id
ORDER BY tr.position

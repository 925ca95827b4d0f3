-- A slot of the given task for this annotator (the gold draw chose it), with its prompt and
-- responses in shown order. No rows: the task is full or closed, or they were assigned it meanwhile.
-- As in next_task.sql, the slot is counted only for an assignment actually made.
WITH candidate AS (
    SELECT t.id FROM tasks t
    WHERE t.id = %(task_id)s AND t.status = 'open' AND t.claimed_count < t.required_annotations
    FOR UPDATE
),
assigned AS (
    INSERT INTO assignments (task_id, user_id, status, created_at, expires_at)
    SELECT id, %(user_id)s, 'active', %(now)s, %(expires_at)s FROM candidate
    ON CONFLICT (task_id, user_id) DO UPDATE
        SET status = 'active', created_at = excluded.created_at, expires_at = excluded.expires_at
        WHERE assignments.status = 'expired'
    RETURNING task_id
),
claimed AS (
    UPDATE tasks SET claimed_count = claimed_count + 1
    FROM assigned WHERE tasks.id = assigned.task_id
    RETURNING tasks.id AS task_id
)
SELECT c.task_id, t.kind, t.prompt_id, p.messages, tr.position,
       r.id AS response_id, r.text
FROM claimed c
JOIN tasks t ON t.id = c.task_id
JOIN prompts p ON p.id = t.prompt_id
JOIN task_responses tr ON tr.task_id = t.id
JOIN responses r ON r.id = tr.response_id
ORDER BY tr.position

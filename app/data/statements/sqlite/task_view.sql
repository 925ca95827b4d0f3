-- The task with its prompt and responses in shown order (the columns of postgres/next_task.sql).
SELECT t.id AS task_id, t.kind, t.prompt_id, p.messages, tr.position,
       r.id AS response_id, r.text
FROM tasks t
JOIN prompts p ON p.id = t.prompt_id
JOIN task_responses tr ON tr.task_id = t.id
JOIN responses r ON r.id = tr.response_id
WHERE t.id = :task_id
ORDER BY tr.position

-- What storing a judgement decides on: the task's prompt and response ids in shown order (a JSON
-- array), and this annotator's assignment of it. No row: there is no such task.
SELECT t.prompt_id, a.id AS assignment_id, a.status AS assignment_status,
       (SELECT json_group_array(response_id) FROM
          (SELECT response_id FROM task_responses WHERE task_id = t.id ORDER BY position)) AS shown
FROM tasks t LEFT JOIN assignments a ON a.task_id = t.id AND a.user_id = :user_id
WHERE t.id = :task_id

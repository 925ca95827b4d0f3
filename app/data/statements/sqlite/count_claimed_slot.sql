-- Count the slot of an assignment just made.
UPDATE tasks SET claimed_count = claimed_count + 1 WHERE id = :task_id

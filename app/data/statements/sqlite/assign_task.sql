-- Assign a slot of the task to this annotator while it has one free, reactivating an assignment
-- they let expire; returns the task id, or no row when the task is full or closed or they hold it.
INSERT INTO assignments (task_id, user_id, status, created_at, expires_at)
SELECT t.id, :user_id, 'active', :now, :expires_at FROM tasks t
WHERE t.id = :task_id AND t.status = 'open' AND t.claimed_count < t.required_annotations
ON CONFLICT (task_id, user_id) DO UPDATE
    SET status = 'active', created_at = excluded.created_at, expires_at = excluded.expires_at
    WHERE assignments.status = 'expired'
RETURNING task_id

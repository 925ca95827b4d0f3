-- The task an annotator works on next, with its prompt and responses in shown order, in one round
-- trip: the task they hold (its deadline pushed: a page reload, a second tab, a retry), or else a
-- free slot of the oldest ordinary task from id floor on that they have not seen (an expired
-- assignment of theirs does not count as seen). No rows: nothing was held or free for them.
--
-- The claim chooses while skipping rows other claims hold, records the assignment (reactivating one
-- they let expire) and counts the slot only for an assignment actually made (none when a concurrent
-- request of the same annotator assigned this task first), so the statement never needs undoing
-- and runs on its own, in autocommit. It runs only when nothing was resumed.
WITH resumed AS (
    UPDATE assignments SET expires_at = %(expires_at)s
    WHERE id = (
        SELECT a.id FROM assignments a JOIN tasks t ON t.id = a.task_id
        WHERE a.user_id = %(user_id)s AND a.status = 'active' AND t.status = 'open'
          AND t.kind = ANY(%(kinds)s)
        ORDER BY a.id LIMIT 1
    )
    RETURNING task_id
),
candidate AS (
    -- Walks ix_tasks_claimable in id order.
    SELECT t.id FROM tasks t
    WHERE NOT EXISTS (SELECT 1 FROM resumed)
      AND t.status = 'open' AND t.claimed_count < t.required_annotations AND t.is_gold = false
      AND t.kind = ANY(%(kinds)s)
      AND t.id >= %(floor)s
      AND NOT EXISTS (
        -- OFFSET 0 keeps this a per-candidate probe of (task_id, user_id): left to itself the
        -- planner turns it into a merge anti-join that reads every assignment of the table, and
        -- each claim grows slower as annotations pile up.
        SELECT 1 FROM assignments a
        WHERE a.task_id = t.id AND a.user_id = %(user_id)s AND a.status <> 'expired'
        OFFSET 0
      )
    ORDER BY t.id LIMIT 1
    FOR UPDATE SKIP LOCKED
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
),
chosen AS (
    SELECT task_id FROM resumed
    UNION ALL
    SELECT task_id FROM claimed
)
SELECT c.task_id, t.kind, t.prompt_id, p.messages, tr.position,
       r.id AS response_id, r.text
FROM chosen c
JOIN tasks t ON t.id = c.task_id
JOIN prompts p ON p.id = t.prompt_id
JOIN task_responses tr ON tr.task_id = t.id
JOIN responses r ON r.id = tr.response_id
ORDER BY tr.position

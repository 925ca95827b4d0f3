-- This annotator's stored judgement of the task, if any (replays compare payload hashes).
SELECT id, payload_hash, ranking, all_bad, skipped, shown_order_unchanged
FROM annotations
WHERE task_id = %(task_id)s AND user_id = %(user_id)s

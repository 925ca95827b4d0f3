-- Store a judgement: one call of prefloop_submit_annotation (migrations/sql/submit_annotation_v3.sql),
-- which commits by itself and derives the comparisons once the ranking fits the task. One row:
-- outcome (stored, or which rule refused it), the task's response ids in shown order (none for a caller without an assignment of the task), and for a stored
-- judgement its id and whether the shown order came back as is.
SELECT outcome, shown, new_annotation_id, shown_order_unchanged
FROM prefloop_submit_annotation(
    %(task_id)s, %(user_id)s, %(named)s, %(flagged)s, %(order)s, %(skip)s, %(all_bad)s,
    CAST(%(ranking)s AS jsonb), %(skip_reason)s, CAST(%(flags)s AS jsonb), %(rationale)s,
    %(time_spent_ms)s, %(payload_hash)s, %(now)s)

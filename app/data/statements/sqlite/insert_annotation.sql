INSERT INTO annotations (task_id, user_id, ranking, all_bad, skipped, skip_reason, flags, rationale,
                         time_spent_ms, shown_order_unchanged, payload_hash, created_at)
VALUES (:task_id, :user_id, :ranking, :all_bad, :skip, :skip_reason, :flags, :rationale,
        :time_spent_ms, :shown_order_unchanged, :payload_hash, :now)
RETURNING id

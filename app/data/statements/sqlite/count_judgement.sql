-- Count the judgement (or give a skipped slot back). A judgement counts only while the task takes
-- one: open, not yet complete, and, when the annotator's assignment expired, with a free slot.
-- Returns the task id, or no row when the task takes no judgement.
UPDATE tasks SET
    annotation_count = annotation_count + :counts,
    claimed_count = claimed_count + :claim_delta,
    status = CASE WHEN annotation_count + :counts >= required_annotations THEN 'done' ELSE status END
WHERE id = :task_id AND (:skip OR (
    status = 'open' AND annotation_count < required_annotations
    AND claimed_count + :claim_delta <= required_annotations))
RETURNING id

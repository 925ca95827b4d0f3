UPDATE assignments SET status = CASE WHEN :skip THEN 'skipped' ELSE 'submitted' END
WHERE id = :assignment_id

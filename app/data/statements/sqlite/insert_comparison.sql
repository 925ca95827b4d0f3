INSERT INTO comparisons (annotation_id, prompt_id, chosen_response_id, rejected_response_id, margin,
                         created_at)
VALUES (:annotation_id, :prompt_id, :chosen, :rejected, :margin, :now)

-- prefloop_submit_annotation, version 3 (migration 0012): a judgement stored in one call.
--
-- The function locks the task row, reads the annotator's assignment after the lock, checks the
-- ranking against the responses shown, counts the judgement, and stores the annotation, its
-- comparisons and the assignment's new status. Called outside a transaction it commits by itself.
-- Validation messages and payload normalisation stay in Python (app/services/annotation.py); the
-- function only says which rule refused a judgement (`outcome`). SQLite runs the same steps under its
-- write lock (app/data/statements/sqlite_runner.py).
--
-- Since version 1: a caller without an assignment of the task is refused before the ranking is
-- checked, and gets no response ids back, so a submission to someone else's task cannot learn them.
-- Since version 2: the comparisons are derived here from p_ranking, after the ranking was checked
-- against the responses shown, instead of arriving as arrays derived before any check. The rule is
-- app.data.statements.pairs.derive_pairs: every response of a better tie group beats every response
-- of a worse one, with margin = the distance between the groups; ties, skips and all-bad give none.
--
-- Each statement of a plpgsql function takes a new snapshot (READ COMMITTED), so the assignment read
-- after the task lock sees what the expiry job or a concurrent submission committed meanwhile.
--
-- A released migration loads this file by name: change the function in a new file
-- (submit_annotation_v4.sql) loaded by a new migration, never here.
CREATE OR REPLACE FUNCTION prefloop_submit_annotation(
    p_task_id integer,
    p_user_id integer,
    p_named integer[],          -- every response id of the ranking, in order
    p_flagged integer[],        -- response ids with flags
    p_order integer[],          -- the ranking when it has no ties, else NULL
    p_skip boolean,
    p_all_bad boolean,
    p_ranking jsonb,
    p_skip_reason text,
    p_flags jsonb,
    p_rationale text,
    p_time_spent_ms integer,
    p_payload_hash text,
    p_now timestamptz,
    OUT outcome text,           -- stored | no_task | judged | invalid | not_assigned | closed
    OUT shown integer[],        -- the task's response ids in shown order
    OUT new_annotation_id integer,
    OUT shown_order_unchanged boolean
)
LANGUAGE plpgsql
AS $$
DECLARE
    v_prompt_id integer;
    v_assignment_id integer;
    v_assignment_status text;
    v_counts integer;
    v_claim_delta integer;
BEGIN
    -- Lock order as everywhere: the task row first, then its assignments.
    SELECT t.prompt_id,
           coalesce((SELECT array_agg(tr.response_id ORDER BY tr.position)
                       FROM task_responses tr WHERE tr.task_id = t.id), '{}')
      INTO v_prompt_id, shown
      FROM tasks t WHERE t.id = p_task_id
       FOR UPDATE;
    IF NOT FOUND THEN
        outcome := 'no_task';
        RETURN;
    END IF;

    SELECT a.id, a.status INTO v_assignment_id, v_assignment_status
      FROM assignments a WHERE a.task_id = p_task_id AND a.user_id = p_user_id;
    IF v_assignment_status IN ('submitted', 'skipped') THEN
        outcome := 'judged';  -- a replay or a changed judgement: the caller compares hashes
        RETURN;
    END IF;

    -- Before the ranking: its refusal names the task's responses, which only its annotators may see.
    IF v_assignment_id IS NULL THEN
        outcome := 'not_assigned';
        shown := NULL;
        RETURN;
    END IF;
    -- Every response exactly once (shown ids are distinct), flags only on shown responses.
    IF NOT (p_named <@ shown AND p_flagged <@ shown
            AND (cardinality(p_named) = 0
                 OR (cardinality(p_named) = cardinality(shown) AND shown <@ p_named))) THEN
        outcome := 'invalid';
        RETURN;
    END IF;

    -- A skip gives a held slot back; a judgement on an expired assignment needs a free slot again.
    IF p_skip THEN
        v_counts := 0;
        v_claim_delta := CASE WHEN v_assignment_status = 'active' THEN -1 ELSE 0 END;
    ELSE
        v_counts := 1;
        v_claim_delta := CASE WHEN v_assignment_status = 'active' THEN 0 ELSE 1 END;
    END IF;
    UPDATE tasks SET
        annotation_count = annotation_count + v_counts,
        claimed_count = claimed_count + v_claim_delta,
        status = CASE WHEN annotation_count + v_counts >= required_annotations THEN 'done' ELSE status END
     WHERE id = p_task_id AND (p_skip OR (
           status = 'open' AND annotation_count < required_annotations
           AND claimed_count + v_claim_delta <= required_annotations));
    IF NOT FOUND THEN
        outcome := 'closed';
        RETURN;
    END IF;

    shown_order_unchanged := NOT p_skip AND NOT p_all_bad AND p_order IS NOT NULL AND p_order = shown;
    INSERT INTO annotations (task_id, user_id, ranking, all_bad, skipped, skip_reason, flags, rationale,
                             time_spent_ms, shown_order_unchanged, payload_hash, created_at)
    VALUES (p_task_id, p_user_id, p_ranking, p_all_bad, p_skip, p_skip_reason, p_flags, p_rationale,
            p_time_spent_ms, shown_order_unchanged, p_payload_hash, p_now)
    RETURNING id INTO new_annotation_id;
    IF NOT p_skip AND NOT p_all_bad THEN
        INSERT INTO comparisons (annotation_id, prompt_id, chosen_response_id, rejected_response_id,
                                 margin, created_at)
        SELECT new_annotation_id, v_prompt_id, chosen.id::integer, rejected.id::integer,
               (worse.pos - better.pos)::double precision, p_now
          FROM jsonb_array_elements(p_ranking) WITH ORDINALITY AS better(ids, pos)
          JOIN jsonb_array_elements(p_ranking) WITH ORDINALITY AS worse(ids, pos) ON worse.pos > better.pos
         CROSS JOIN LATERAL jsonb_array_elements_text(better.ids) WITH ORDINALITY AS chosen(id, pos)
         CROSS JOIN LATERAL jsonb_array_elements_text(worse.ids) WITH ORDINALITY AS rejected(id, pos)
         ORDER BY better.pos, worse.pos, chosen.pos, rejected.pos;
    END IF;
    UPDATE assignments SET status = CASE WHEN p_skip THEN 'skipped' ELSE 'submitted' END
     WHERE id = v_assignment_id;
    outcome := 'stored';
END
$$

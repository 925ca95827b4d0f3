"""The pairwise exports train TRL's DPOTrainer and RewardTrainer as loaded, with no reshaping."""

from __future__ import annotations

import shutil

import pytest
import torch

from app.services.exports import ExportSpec, export_dataset
from tests.world import World, export_history

KEY = "test-pseudonym-key-that-is-long-enough-0123456789"


@pytest.fixture
def exported(sqlite_template, tmp_path):
    """Export the seeded history once per format from a SQLite copy (TRL does not care which database)."""
    import datasets

    from app.config import Settings
    from app.data.db import make_engine, session_factory

    path = tmp_path / "prefloop.db"
    shutil.copy(sqlite_template, path)
    engine = make_engine(f"sqlite:///{path}")
    folders = {}
    with session_factory(engine)() as db:
        export_history(World(db, Settings(data_dir=tmp_path / "data")))
        for name in ("pairwise", "pairwise_text"):
            spec = ExportSpec(format=name, layout="folder", split_mode="none")
            export_dataset(db, spec, tmp_path / name, pseudonym_key=KEY)
            folders[name] = tmp_path / name
    engine.dispose()
    return {
        name: datasets.load_dataset(str(folder), cache_dir=str(tmp_path / "hf"))["train"]
        for name, folder in folders.items()
    }


def _common_args(tmp_path):
    return dict(
        output_dir=str(tmp_path / "trainer"),
        max_steps=1,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        max_length=128,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        bf16=False,
        dataloader_num_workers=0,
        seed=0,
    )


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _changed(model, before) -> bool:
    return any(not torch.equal(before[n], p.detach()) for n, p in model.named_parameters() if n in before)


@pytest.mark.parametrize("form", ["pairwise", "pairwise_text"])
def test_dpo_trains_one_step_on_the_export(exported, tiny_model_dir, tmp_path, form):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = _snapshot(model)
    trainer = DPOTrainer(
        model=model,
        args=DPOConfig(**_common_args(tmp_path)),
        train_dataset=exported[form],
        processing_class=tokenizer,
    )
    output = trainer.train()
    assert output.global_step == 1 and torch.isfinite(torch.tensor(output.training_loss))
    assert _changed(model, before)


@pytest.mark.parametrize("form", ["pairwise", "pairwise_text"])
def test_reward_trainer_trains_one_step_on_the_export_with_its_margin(
    exported, tiny_model_dir, tmp_path, form
):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    before = _snapshot(model)
    trainer = RewardTrainer(
        model=model,
        args=RewardConfig(**_common_args(tmp_path)),
        train_dataset=exported[form],
        processing_class=tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert "margin" in batch  # the exported margin reaches the loss
    output = trainer.train()
    assert output.global_step == 1 and torch.isfinite(torch.tensor(output.training_loss))
    assert _changed(model, before)


def test_pairwise_text_can_use_a_policy_chat_template(sqlite_template, tiny_model_dir, tmp_path):
    from sqlalchemy import update

    from app.config import Settings
    from app.data.db import make_engine, session_factory
    from app.data.models import Policy
    from app.services.exports import iter_rows

    path = tmp_path / "prefloop.db"
    shutil.copy(sqlite_template, path)
    engine = make_engine(f"sqlite:///{path}")
    with session_factory(engine)() as db:
        seeded = export_history(World(db, Settings(data_dir=tmp_path / "data")))
        db.execute(update(Policy).where(Policy.version == 1).values(path=str(tiny_model_dir)))
        db.commit()
        spec = ExportSpec(format="pairwise_text", text_template="chat_template", chat_template_version=1)
        rows = {row["prompt_id"]: row for _, row, _ in iter_rows(db, spec, pseudonym_key=KEY)}
    engine.dispose()
    row = rows[seeded.prompts["p2"]]
    # SmolLM2's ChatML template: the system turn, both user turns and the open assistant turn.
    assert row["prompt"].startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert "<|im_start|>user\nName a prime.<|im_end|>" in row["prompt"]
    assert row["prompt"].endswith("<|im_start|>assistant\n") and row["chosen"] == "2"

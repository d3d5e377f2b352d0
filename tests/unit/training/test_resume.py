"""Which checkpoint a stage resumes from: the newest one saved to the end, never a folder a kill cut short."""

import json

import torch

from latentalign.training import newest_checkpoint


def checkpoint(root, step, processes=2, state=None):
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    for rank in range(processes):
        torch.save({"cpu": torch.random.get_rng_state()}, folder / f"rng_state_{rank}.pth")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}) if state is None else state)
    return folder


def test_the_newest_complete_checkpoint_is_resumed(tmp_path):
    assert newest_checkpoint(tmp_path / "absent") is None and newest_checkpoint(tmp_path) is None
    checkpoint(tmp_path, 4)
    newest = checkpoint(tmp_path, 12)
    checkpoint(tmp_path, 8)
    (tmp_path / "checkpoint-20.old").mkdir()  # not a checkpoint's name
    (tmp_path / "checkpoint-30").write_text("a file")
    assert newest_checkpoint(tmp_path) == str(newest)  # by step, not by name: 12 after 8


def test_a_checkpoint_cut_short_is_passed_over_for_the_one_before(tmp_path):
    checkpoint(tmp_path, 4)
    marked_early = checkpoint(tmp_path, 8)
    rng = marked_early / "rng_state_1.pth"
    rng.write_bytes(rng.read_bytes()[:100])  # another process was killed while writing its RNG state
    unmarked = checkpoint(tmp_path, 12, state="")  # killed as trainer_state.json was being written
    checkpoint(tmp_path, 16)
    (tmp_path / "checkpoint-16" / "trainer_state.json").unlink()  # killed before it was written
    passed_over = []
    assert newest_checkpoint(tmp_path, passed_over).endswith("checkpoint-4")
    assert passed_over == [f"{tmp_path / 'checkpoint-16'} (no readable trainer_state.json)",
                           f"{unmarked} (no readable trainer_state.json)", f"{marked_early} (rng_state_1.pth is cut short)"]

    (marked_early / "rng_state_1.pth").unlink()  # one process's RNG state absent: transformers goes on without it
    assert newest_checkpoint(tmp_path) == str(marked_early)


def test_a_one_process_checkpoint_resumes(tmp_path):
    single = checkpoint(tmp_path, 3, processes=0)
    torch.save({"cpu": torch.random.get_rng_state()}, single / "rng_state.pth")
    assert newest_checkpoint(tmp_path) == str(single)


def test_resuming_under_other_settings_says_which(tmp_path, caplog):
    import logging

    from latentalign.stages import load_config
    from latentalign.training.loop import _record_settings

    first = load_config("sft", None, [f"output_dir={tmp_path}", "max_steps=4"])
    _record_settings(first, None)
    with caplog.at_level(logging.WARNING):
        _record_settings(first, str(tmp_path / "checkpoint-4"))  # the same settings: nothing to say
        assert caplog.text == ""
        _record_settings(load_config("sft", None, [f"output_dir={tmp_path}", "max_steps=4", "learning_rate=0.5",
                                                   "lora_r=8"]), str(tmp_path / "checkpoint-4"))
    assert "saved under other settings (learning_rate: the default -> 0.5; lora_r: 16 -> 8)" in caplog.text
    assert json.loads((tmp_path / "settings.json").read_text())["learning_rate"] == 0.5

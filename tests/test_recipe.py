"""train.sh is the recipe's one home: `bash train.sh --print` resolves it, and train.py's own
defaults must be the same recipe (so `python train.py` alone trains what train.sh would)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import train
from tools.recipe import REPO, arg_value, train_args, train_command

# Flags whose train.sh value is a location, not a hyperparameter: train.py's default may differ.
LOCATIONS = {"--model_name_or_path", "--output_dir"}
# store_true switches train.sh turns on; train.py's standalone default is off.
SWITCHES = {"--is_skip", "--gradient_checkpointing", "--plot_to_images", "--overwrite_output_dir"}


def real_model_dir(tmp_path: Path) -> Path:
    """A folder that train.sh takes for real weights (it only looks for config.json)."""
    folder = tmp_path / "Baichuan2-7B-Chat"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "baichuan"}))
    return folder


def test_train_py_defaults_are_the_7b_recipe(tmp_path: Path) -> None:
    args = train_args({"MODEL": str(real_model_dir(tmp_path))})
    resolved = vars(train.parse_args(args))
    defaults = vars(train.parse_args([]))
    flags = [a for a in args if a.startswith("--")]
    assert len(flags) > 15
    differ = {f: (arg_value(args, f), defaults[f[2:]]) for f in flags
              if f not in LOCATIONS | SWITCHES and resolved[f[2:]] != defaults[f[2:]]}
    assert not differ, f"train.py's defaults disagree with train.sh's recipe (train.sh, train.py): {differ}"
    assert {"--is_skip", "--gradient_checkpointing"} <= set(flags)


def test_tiny_default_settings_and_overrides(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-weights")
    tiny = train_args({"MODEL": missing})
    assert arg_value(tiny, "--model_name_or_path") == "output/tiny-baichuan2-chat"
    assert arg_value(tiny, "--modules_to_save") == "embed_tokens,lm_head"
    assert "--gradient_checkpointing" not in tiny and "--is_skip" in tiny
    # A variable the caller sets beats both the recipe and the tiny settings.
    custom = train_args({"MODEL": missing, "EPOCHS": "7", "BATCH_SIZE": "4", "GRADIENT_CHECKPOINTING": "1"})
    assert arg_value(custom, "--num_train_epochs") == "7" and arg_value(custom, "--per_device_train_batch_size") == "4"
    assert "--gradient_checkpointing" in custom
    assert "--modules_to_save_lr" not in train_args({"MODEL": missing, "MODULES_TO_SAVE_LR": ""})
    assert arg_value(train_args({"MODEL": missing, "MODULES_TO_SAVE_LR": "3e-4"}), "--modules_to_save_lr") == "3e-4"


def test_print_runs_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = train_command({"MODEL": str(tmp_path / "none"), "TINY_MODEL": str(tmp_path / "tiny"),
                         "OUTPUT_DIR": str(out), "NUM_GPUS": "2"})
    assert cmd[:3] == ["deepspeed", "--num_gpus", "2"] and "train.py" in cmd
    assert not (tmp_path / "tiny").exists() and not out.exists()


def test_train_sh_refuses_other_arguments() -> None:
    proc = subprocess.run(["bash", "train.sh", "--epochs", "3"], cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error:")
    assert proc.stdout == ""


@pytest.mark.parametrize("doc", ["README.md"])
def test_readme_trains_through_train_sh(doc: str) -> None:
    """The README shows no hand-written train.py recipe: it points at train.sh (--print for the command)."""
    text = (REPO / doc).read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if "train.py " in line and "--learning_rate" in line]
    assert not lines, lines
    assert "train.sh --print" in text


def test_roles_train_one_adapter_per_role(tmp_path: Path) -> None:
    """ROLES=a,b: one train.py run per role, each on its own records (--roles) into its own folder, with
    the shared recipe otherwise unchanged; the README's loss plot stays the shared adapter's."""
    from tools.recipe import train_commands

    env = {"MODEL": str(tmp_path / "none"), "TINY_MODEL": str(tmp_path / "tiny")}
    shared = train_args(env)
    runs = train_commands({**env, "ROLES": "孙悟空,赵子龙", "ROLE_OUTPUT_ROOT": str(tmp_path / "roles")})
    assert len(runs) == 2
    for role, cmd in zip(["孙悟空", "赵子龙"], runs, strict=True):
        args = cmd[cmd.index("train.py") + 1:]
        assert arg_value(args, "--roles") == role and arg_value(args, "--output_dir") == str(tmp_path / "roles" / role)
        assert "--plot_to_images" not in args and "--plot_to_images" in shared
        drop = {"--roles", "--output_dir"}
        mine = [a for i, a in enumerate(args) if a not in drop and (i == 0 or args[i - 1] not in drop)]
        common = [a for i, a in enumerate(shared) if a not in drop and (i == 0 or shared[i - 1] not in drop)]
        assert [a for a in mine if a != "--plot_to_images"] == [a for a in common if a != "--plot_to_images"]
    default_root = train_commands({**env, "ROLES": "孙悟空"})[0]
    assert arg_value(default_root, "--output_dir") == arg_value(shared, "--output_dir") + "-roles/孙悟空"
    with pytest.raises(RuntimeError, match="train_commands"):
        train_command({**env, "ROLES": "孙悟空,赵子龙"})
    assert not (tmp_path / "roles").exists() and not (tmp_path / "tiny").exists()  # --print runs nothing

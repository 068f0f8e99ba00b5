"""Session fixtures shared by the test modules.

* `tiny_world`: a synthetic world, a tiny random T5 BLIP-2 and a feature store of its ViT tokens
  (`pipeline.demo.tinyworld`), built once per session; `tiny_config(world, out_dir, **sections)`
  from the same module makes a small training config over it.
* `tiny_models`: tiny random BLIP-2 folders of both language-model flavours (T5, OPT) whose
  tokenizer knows the synthetic world's words.
* `one_thread`: torch on one thread for the module (tiny models run far faster on one thread than
  with OpenMP spinning on 2 busy cores).
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    from pipeline.demo.tinyworld import build_tiny_world

    torch.set_num_threads(1)
    return build_tiny_world(tmp_path_factory.getbasetemp() / "train_world")


@pytest.fixture(scope="session")
def tiny_models(tiny_world, tmp_path_factory):
    """{"tiny-t5": folder, "tiny-opt": folder} with the tiny world's vocabulary."""
    from pipeline.demo.testmodels import init_model

    root = tmp_path_factory.mktemp("tiny_models")
    return {
        name: str(init_model(root / name, name, vocab_from=tiny_world["annotations"], seed=0))
        for name in ("tiny-t5", "tiny-opt")
    }


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

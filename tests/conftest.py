"""Tiny TransformerLens models of every generation installed, built from a config (no downloads)."""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny tensors gain nothing from threads, and OpenMP spin-waits on 2 shared cores cost ~10x."""
    torch.set_num_threads(1)


TINY = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=64, d_vocab=200, act_fn="gelu_new",
            normalization_type="LN")


def _bridge(compat: bool):
    pytest.importorskip("transformer_lens.model_bridge", reason="this TransformerLens has no TransformerBridge (2.x)")
    from transformer_lens.model_bridge import TransformerBridge

    try:
        from transformer_lens.config import TransformerBridgeConfig
    except ImportError:  # older 3.x layout
        from transformer_lens.model_bridge import TransformerBridgeConfig
    torch.manual_seed(0)
    model = TransformerBridge.boot_native(TransformerBridgeConfig(**TINY))
    if compat:
        model.enable_compatibility_mode()
    return model


def _hooked():
    import transformer_lens

    try:
        HookedTransformer = transformer_lens.HookedTransformer
        HookedTransformerConfig = transformer_lens.HookedTransformerConfig
    except (ImportError, AttributeError):
        pytest.skip("this TransformerLens has no HookedTransformer (4.x)")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return HookedTransformer(HookedTransformerConfig(**TINY))


MODEL_KINDS = ["hooked", "bridge", "bridge_compat"]


def make_model(kind: str):
    if kind == "hooked":
        return _hooked()
    return _bridge(compat=kind == "bridge_compat")


@pytest.fixture(params=MODEL_KINDS)
def model(request):
    m = make_model(request.param)
    m.eval()
    return m


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def n_hooks(model) -> int:
    """Forward hooks currently attached anywhere in the model (each HookPoint counted once)."""
    seen = {id(hp): hp for hp in model.hook_dict.values()}
    return sum(len(hp.fwd_hooks) for hp in seen.values())


@pytest.fixture(scope="session")
def gpt2_folder(tmp_path_factory):
    """A local Hugging Face folder: a tiny random GPT-2 and a byte-level BPE tokenizer trained in-process."""
    from helpers import train_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = train_tokenizer("gpt")
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_ctx=64, n_embd=32, n_layer=2, n_head=4,  # TL 3.9 reads n_ctx
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    GPT2LMHeadModel(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def interrupted_and_resumed(make, shard, root, rank: int, crashed_rank: int) -> dict:
    """Inside a ``torch.distributed`` worker: fit a collector from ``make()`` on ``shard`` without interruption, and
    another resumed from the checkpoints under ``root`` of a run "interrupted" after 3 batches, where
    ``crashed_rank`` lost its newest checkpoint (a crash between the ranks' writes). Returns what to compare:
    ``same`` (per hook whose learner this rank holds: dictionaries equal bit for bit), ``n`` (both ``n_tokens``)
    and ``rows`` (both reports' rows, as repr)."""
    import shutil

    import torch.distributed as dist

    full = make().fit(shard, progress=False)
    make().fit(shard[:3], progress=False, checkpoint_dir=root, checkpoint_every=1)
    if rank == crashed_rank:
        mine = root / f"rank{rank:03d}-of-{dist.get_world_size():03d}"
        shutil.rmtree(sorted(mine.glob("ckpt-*"))[-1])
        (mine / "LATEST").unlink()
    dist.barrier()
    resumed = make().fit(shard, progress=False, checkpoint_dir=root)
    held = [n for n, lr in full.learners.items() if lr.initialized]
    return {"same": {n: torch.equal(full.learners[n].dictionary_, resumed.learners[n].dictionary_) for n in held},
            "n": (full.n_tokens, resumed.n_tokens),
            "rows": (repr(full.report().to_dict()["rows"]), repr(resumed.report().to_dict()["rows"]))}


def _gloo_worker(rank: int, world: int, init: str, out: str, fn, args: tuple) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.save(fn(rank, *args), f"{out}/rank{rank}.pt")
        dist.barrier()  # tear down together: gloo aborts a rank whose peer has already gone
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's and C++'s exit-time teardown: about once in 50 runs on a busy 2-core machine,
    # gloo (torch 2.13) aborted a finished worker there ("terminate called without an active exception"), after
    # its result was saved. Only a worker that got here, with its result written, exits this way.
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


def on_two_gloo_ranks(fn, out, *args) -> list:
    """Run ``fn(rank, *args)`` in 2 spawned processes joined by a gloo process group (store and results in the
    folder ``out``); returns each rank's return value, rank 0's first. ``fn`` must be a module-level function."""
    import torch.multiprocessing as mp

    mp.spawn(_gloo_worker, args=(2, f"file://{out}/store", str(out), fn, args), nprocs=2, join=True)
    return [torch.load(f"{out}/rank{r}.pt", weights_only=False) for r in range(2)]

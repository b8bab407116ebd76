"""train.cuda_graph (sae/cuda_graph.py): the captured step is the eager step, replayed. On the CPU,
what cannot be captured is refused with the reason; on a GPU, the training step takes no host sync,
and graphed training (both AuxK phases, a short last batch) ends with the eager run's weights."""

import pytest
import torch

from sae.config import SAEConfig, TrainConfig, graphs_by_default
from sae.cuda_graph import StepGraphs
from sae.loss import NO_DEAD, AuxMode, DeadLatents
from sae.train import EagerSteps, Trainer, train_saes

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize(
    "over, says",
    [({}, "device cpu (CUDA only)"), ({"optimizer": "adam"}, "optimizer adam"), ({"triton": False}, "triton false")],
)
def test_a_step_that_cannot_be_captured_is_refused_with_the_reason(over, says):
    with pytest.raises(ValueError) as e:
        Trainer(SAEConfig(16, 64, 4), TrainConfig(tokens=4096, cuda_graph=True, **over))
    assert str(e.value).startswith("train.cuda_graph: not with") and says in str(e.value)


def make_trainer(precision: str, graph: bool, x: torch.Tensor) -> Trainer:
    # dead after 5 batches: the run crosses from the phase without AuxK into the one with it
    tcfg = TrainConfig(
        batch_tokens=512,
        tokens=x.shape[0],
        device="cuda",
        dead_tokens=5 * 512,
        aux_k=64,
        precision=precision,
        cuda_graph=graph,
        log_every=1000,
    )
    trainer = Trainer(SAEConfig(128, 2048, 16), tcfg)
    trainer.initialize(x[:4096])
    return trainer


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_training_step_takes_no_host_sync(precision):
    x = torch.randn(2048, 128, generator=torch.Generator().manual_seed(0))
    trainer = make_trainer(precision, False, x)
    batch = x[:512].cuda()
    trainer.step(batch)  # compiles the Triton kernels and sets up the optimizer's state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.tracker.tokens_since_fired[:5] = trainer.tracker.dead_tokens
        mask = trainer.tracker.dead_mask()
        # no AuxK, AuxK over the mask, AuxK over the 5 dead latents' rows
        for dead in (NO_DEAD, DeadLatents(AuxMode.MASKED, mask), DeadLatents(AuxMode.DEAD_ROWS, mask, 5, 5)):
            trainer.device_step(batch, dead)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graphed_training_ends_with_the_eager_runs_weights(precision):
    steps = 14
    x = torch.randn(steps * 512 + 200, 128, generator=torch.Generator().manual_seed(1))
    runs = {}
    for graph in (False, True):
        trainer = make_trainer(precision, graph, x)
        if not graph:  # the eager run takes the graph's AuxK form (over the mask, not the dead rows alone):
            counted = trainer.dead_latents  # the same kernels, so equal to float rounding
            trainer.dead_latents = lambda counted=counted, tracker=trainer.tracker: (
                DeadLatents.masked(tracker.dead_mask()) if counted() is not NO_DEAD else NO_DEAD
            )
        losses = [trainer.step(x[i * 512 : (i + 1) * 512]).loss.item() for i in range(steps)]
        losses.append(trainer.step(x[steps * 512 :]).loss.item())  # a short batch: eager, beside the graph
        runs[graph] = trainer, losses
    (eager, eager_losses), (graphed, graphed_losses) = runs[False], runs[True]
    # both phases were captured (on the CPU this data leaves 1-3 latents dead from step 5 on, none at step 8:
    # the run goes back and forth between them)
    assert set(graphed.runner.captured) == {False, True}
    assert graphed.steps == eager.steps and graphed.tokens == eager.tokens
    assert torch.tensor(eager_losses).isfinite().all()
    assert torch.allclose(torch.tensor(graphed_losses), torch.tensor(eager_losses), rtol=1e-5), (
        graphed_losses,
        eager_losses,
    )
    for (name, a), b in zip(graphed.sae.named_parameters(), eager.sae.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (name, (a - b).abs().max().item())
    for a, b in zip(graphed.final_sae().parameters(), eager.final_sae().parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert torch.equal(graphed.tracker.tokens_since_fired, eager.tracker.tokens_since_fired)


@needs_cuda
def test_a_graphed_run_resumed_from_its_checkpoint_ends_as_the_uninterrupted_one():
    """Loading a checkpoint replaces the tensors a captured graph writes: the trainer captures anew."""
    x = torch.randn(10 * 512, 128, generator=torch.Generator().manual_seed(2))
    batches = x.split(512)
    straight = make_trainer("fp32", True, x)
    for batch in batches:
        straight.step(batch)
    first = make_trainer("fp32", True, x)
    for batch in batches[:6]:
        first.step(batch)
    resumed = make_trainer("fp32", True, x)
    for batch in batches[:4]:  # a graph captured on this trainer's own tensors
        resumed.step(batch)
    assert resumed.runner.captured
    resumed.load_state_dict(*first.state_dict())
    assert not resumed.runner.captured
    for batch in batches[6:]:
        resumed.step(batch)
    for a, b in zip(resumed.sae.parameters(), straight.sae.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "cfg, over, graphs",
    [
        (SAEConfig(16, 64, 4), {}, True),
        (SAEConfig(16, 64, 4, transcoder=True, skip_connection=True), {}, False),
        (SAEConfig(16, 64, 4), {"device": "cpu"}, False),
        (SAEConfig(16, 64, 4), {"optimizer": "adam"}, False),
        (SAEConfig(16, 64, 4), {"triton": False}, False),
        (SAEConfig(16, 64, 4), {"multi_topk": True}, False),
        (SAEConfig(16, 64, 4, activation="batchtopk"), {}, False),
        (SAEConfig(16, 64, 4, matryoshka=(16, 48)), {}, False),
        (SAEConfig(16, 64, 4, transcoder=True, cross_layer=2), {}, False),
    ],
)
def test_unset_cuda_graph_means_graphs_where_they_can_be_captured_and_were_checked(cfg, over, graphs):
    tcfg = TrainConfig(tokens=4096, **{"device": "cuda", **over})
    assert tcfg.cuda_graph is None and graphs_by_default(cfg, tcfg) is graphs
    assert not graphs_by_default(cfg, tcfg, processes=2)


def test_unset_cuda_graph_on_the_cpu_runs_eager_steps():
    assert isinstance(Trainer(SAEConfig(16, 64, 4), TrainConfig(tokens=4096)).runner, EagerSteps)


@needs_cuda
def test_unset_cuda_graph_on_a_gpu_replays_graphs():
    assert isinstance(Trainer(SAEConfig(16, 64, 4), TrainConfig(tokens=4096, device="cuda")).runner, StepGraphs)


@needs_cuda
def test_trainers_sharing_one_graph_pool_end_as_each_trained_alone():
    """Every captured step draws on one memory pool: two SAEs trained together, their graphs and
    phases interleaved, end with the weights each ends with when trained alone."""
    steps = 12
    x = torch.randn(steps * 512, 128, generator=torch.Generator().manual_seed(3))
    batches = x.split(512)

    def pair():
        a = make_trainer("bf16", True, x)
        b = Trainer(SAEConfig(128, 1024, 8), a.tcfg)
        b.initialize(x[:4096])
        return a, b

    together = pair()
    train_saes(list(together), iter(batches), progress=False)
    for i, alone in enumerate(pair()):
        train_saes([alone], iter(batches), progress=False)
        assert alone.runner.captured and together[i].runner.captured
        for p, q in zip(alone.sae.parameters(), together[i].sae.parameters()):
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), (p - q).abs().max().item()


@needs_cuda
def test_a_graphed_transcoder_ends_with_the_eager_runs_weights():
    x = torch.randn(10 * 512, 256, generator=torch.Generator().manual_seed(4))
    runs = []
    for graph in (False, True):
        tcfg = TrainConfig(batch_tokens=512, tokens=x.shape[0], device="cuda", precision="fp32", cuda_graph=graph)
        t = Trainer(SAEConfig(128, 1024, 16, transcoder=True, skip_connection=True), tcfg)
        t.initialize(x[:4096])
        train_saes([t], iter(x.split(512)), progress=False)
        runs.append(t)
    assert runs[1].runner.captured
    for (name, a), b in zip(runs[1].sae.named_parameters(), runs[0].sae.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (name, (a - b).abs().max().item())

"""The jitted train and eval steps, with declared in/out shardings and donated buffers.

One optimizer step = `grad_step` once per micro-batch (gradients summed into a float32 accumulator that
lives sharded like the parameters) + `apply_step` once. Each micro-batch carries its target slots with
weights that already hold the global normalisation (see loss.py and batch.py), so the summed gradient is
the exact gradient of the global batch's loss, however the batch was split into micro-batches, devices or
hosts. The micro-batch count follows the data, so accumulation is a Python loop over compiled programs
(one per micro-batch shape, see trainer.shape_buckets), not a scan that would recompile for every count.
Only the trainable parameters (all, or the LoRA adapters: lora.trainable_names) are differentiated,
accumulated and optimised; the frozen rest is a plain input of the grad step.

A mixture of experts differentiates cross-entropy + its router losses (loss.py `MoeObjective`,
`router_losses`); each micro-step also gets the step's real-token count (counted on the devices from the
micro-batches' segment ids before the first micro-step), which scales the router losses. The figures
logged apart (cross-entropy, router losses, expert load, dropped assignments) are summed over the
micro-steps like the gradients.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jsft.data.batch import MicroBatch
from jsft.models.decoder import Decoder
from jsft.models.lora import trainable_names
from jsft.models.params import param_arrays, param_shardings, replace_params
from jsft.sharding import row_sharding
from jsft.train.feeders import mesh_feeders
from jsft.train.loss import MoeObjective, router_losses, weighted_nll
from jsft.train.optim import consecutive_skips, current_lr, skipped_steps

HOST_MEMORY = "pinned_host"

# The host builds MicroBatches of numpy arrays (jsft/data/batch.py, no jax there); here, where they cross to
# the devices, the type becomes a pytree, so the compiled steps take and trace it whole.
jax.tree_util.register_dataclass(MicroBatch)


def check_memory_kind(mesh: Mesh, kind: str) -> None:
    """Fail early, with the kinds there are, when the mesh's devices cannot address `kind` memory."""
    for device in mesh.devices.flat:
        kinds = sorted(m.kind for m in device.addressable_memories())
        if kind not in kinds:
            raise ValueError(
                f"optim.offload_state needs '{kind}' memory, but {device.platform} device {device.id} offers "
                f"{', '.join(kinds)}"
            )


class TrainStep:
    """Compiled functions over (params, opt_state) for one model, optimizer and mesh; the micro-step
    compiles once per micro-batch shape it is given."""

    def __init__(
        self, model: Decoder, optimizer: optax.GradientTransformation, mesh: Mesh, *, chunk_size: int,
        offload_opt_state: bool = False, moe: Optional[MoeObjective] = None,
    ):
        """`moe`: a mixture of experts' router losses and dispatch (default: cross-entropy alone, dropless)."""
        self.template = model  # structure and static config; parameters are passed as a flat dict
        self.moe = (moe or MoeObjective()) if model.config.moe is not None else None
        # training's model: capacity-bounded dispatch where asked; validation keeps the template's (dropless)
        self.train_template = model
        if self.moe is not None and self.moe.capacity_factor is not None:
            self.train_template = with_capacity_factor(model, self.moe.capacity_factor)
        self.trainable = set(trainable_names(model))
        params, _ = self.split(param_arrays(model))
        self.optimizer, self.mesh, self.chunk_size = optimizer, mesh, chunk_size
        # shardings of the trainable parameters (their gradients and optimizer state) and the frozen ones
        self.param_shardings, self.frozen_shardings = self.split(param_shardings(model, mesh))
        replicated = NamedSharding(mesh, P())
        abstract_opt = jax.eval_shape(optimizer.init, params)
        # Where the optimizer state is used (device memory) and where it lives between steps: the same,
        # or pinned host memory with optim.offload_state (moved in and out by the update program).
        self.opt_device_shardings = optax.tree_utils.tree_map_params(
            optimizer, lambda _, s: s, abstract_opt, self.param_shardings,
            transform_non_params=lambda _: replicated,
        )
        self.offload_opt_state = offload_opt_state
        self.opt_shardings = self.opt_device_shardings
        if offload_opt_state:
            check_memory_kind(mesh, HOST_MEMORY)
            self.opt_shardings = jax.tree.map(lambda s: s.with_memory_kind(HOST_MEMORY), self.opt_device_shardings)
        self.row_sharding = row_sharding(mesh)  # rows over data x fsdp, tokens / target slots over sequence
        self.feeders = mesh_feeders(mesh)  # who passes which rows to device_batch
        self._init_opt = jax.jit(optimizer.init, out_shardings=self.opt_shardings)
        self._zeros = jax.jit(
            lambda p: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), p), out_shardings=self.param_shardings
        )
        self._grad = jax.jit(
            self._grad_step,
            in_shardings=(self.param_shardings, self.frozen_shardings, self.param_shardings, self.row_sharding,
                          replicated),
            out_shardings=(self.param_shardings, replicated),
            donate_argnums=(2,),
        )
        self._real_tokens = jax.jit(lambda s: jnp.sum(s > 0, dtype=jnp.float32), out_shardings=replicated)
        self._unused_tokens = jax.device_put(jnp.zeros((), jnp.float32), replicated)  # a dense model's step_tokens
        self._apply = jax.jit(
            self._apply_step,
            in_shardings=(self.param_shardings, self.opt_shardings, self.param_shardings),
            out_shardings=(self.param_shardings, self.opt_shardings, replicated),
            donate_argnums=(0, 1),
        )
        self._eval = jax.jit(
            self._weighted_loss, in_shardings=({**self.param_shardings, **self.frozen_shardings}, self.row_sharding),
            out_shardings=replicated,
        )

    # ---- traced functions ---------------------------------------------------------------------------------------

    def _cross_entropy(self, template, params, batch: MicroBatch):
        """(sum(target_weight * nll) over the micro-batch, the weights carrying the global normalisation;
        MoeStats stacked over the sparse layers, or None for a dense model)."""
        model = replace_params(template, params)
        hidden, _, moe_stats = model.hidden_states_and_stats(batch.input_ids, batch.positions, batch.segment_ids)
        loss = weighted_nll(hidden, model.unembed(), batch, self.chunk_size, model.config.final_logit_softcapping)
        return loss, moe_stats

    def _objective(self, params, batch: MicroBatch, step_tokens):
        """(what is differentiated: the cross-entropy + the router losses x their coefficients; the
        micro-batch's figures, each a sum over micro-batches: loss (the cross-entropy), and for a mixture of
        experts aux_loss, z_loss (before coefficients), load [L_sparse, E] (tokens routed to each expert)
        and dropped (assignments dropped by capacity, all layers))."""
        ce, stats = self._cross_entropy(self.train_template, params, batch)
        if stats is None:
            return ce, {"loss": ce}
        aux, z = router_losses(stats, step_tokens)
        total = ce
        if self.moe.aux_coef:
            total = total + self.moe.aux_coef * aux
        if self.moe.z_coef:
            total = total + self.moe.z_coef * z
        figures = {"loss": ce, "aux_loss": aux, "z_loss": z, "load": stats.expert_counts,
                   "dropped": jnp.sum(stats.dropped)}
        return total, jax.lax.stop_gradient(figures)

    def _weighted_loss(self, params, batch: MicroBatch) -> jax.Array:
        return self._cross_entropy(self.template, params, batch)[0]

    def _grad_step(self, params, frozen, acc, batch, step_tokens):
        (_, figures), grads = jax.value_and_grad(
            lambda p: self._objective({**frozen, **p}, batch, step_tokens), has_aux=True)(params)
        acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads)
        return acc, figures

    def _apply_step(self, params, opt_state, grads):
        if self.offload_opt_state:  # host -> device for the update; out_shardings send it back
            opt_state = jax.device_put(opt_state, self.opt_device_shardings)
        grad_norm = optax.tree.norm(grads)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        # the step's figures as fresh outputs: the opt_state leaves they come from are donated to the next
        # step, which the loop dispatches before it reads this one (jsft/train/inflight.py)
        stats = {
            "grad_norm": grad_norm, "lr": current_lr(opt_state), "skipped_steps": skipped_steps(opt_state),
            "consecutive_skips": consecutive_skips(opt_state),
        }
        return optax.apply_updates(params, updates), opt_state, jax.tree.map(jnp.copy, stats)

    # ---- host-side API -----------------------------------------------------------------------------------------

    def split(self, params: dict) -> tuple[dict, dict]:
        """(trainable, frozen) parts of a flat parameter dict."""
        train = {n: v for n, v in params.items() if n in self.trainable}
        return train, {n: v for n, v in params.items() if n not in train}

    def init_opt_state(self, params):
        return self._init_opt(self.split(params)[0])

    def device_batch(self, local: MicroBatch) -> MicroBatch:
        """The host -> device boundary: a host-local MicroBatch (numpy) -> the same fields as global arrays
        sharded over the batch axes. Each feeder passes its own rows, whole: the global shape says so, and
        each device takes its token slice (jsft/train/feeders.py)."""
        def put(x):
            x = np.asarray(x)
            return jax.make_array_from_process_local_data(self.row_sharding, x, (x.shape[0] * self.feeders.count, *x.shape[1:]))

        return jax.tree.map(put, local)

    def step_tokens(self, micro_batches: list[MicroBatch]) -> jax.Array:
        """Real (non-padding) tokens of a step over all its micro-batches and devices: a replicated device
        scalar, which scales the router losses. A dense model has none: no count is dispatched for it."""
        if self.moe is None:
            return self._unused_tokens
        with jax.set_mesh(self.mesh):
            return sum(self._real_tokens(b.segment_ids) for b in micro_batches)

    def gradients(self, params, micro_batches: list[MicroBatch], with_figures: bool = False):
        """(cross-entropy, summed float32 gradients of the trainable parameters' objective) of one global batch
        given as device micro-batches; `with_figures`: and the figures of `_objective` summed over them."""
        params, frozen = self.split(params)
        step_tokens = self.step_tokens(micro_batches)
        with jax.set_mesh(self.mesh):  # traced under the mesh, so block-boundary constraints keep rows split
            acc = self._zeros(params)
            figures = None
            for batch in micro_batches:
                acc, micro = self._grad(params, frozen, acc, batch, step_tokens)
                figures = micro if figures is None else jax.tree.map(jnp.add, figures, micro)
        return (figures["loss"], acc, figures) if with_figures else (figures["loss"], acc)

    def train_step_stats(self, params, opt_state, micro_batches: list[MicroBatch]):
        """One optimizer step, dispatched without waiting; returns (params, opt_state, loss, stats) with
        stats {grad_norm, lr, skipped_steps, consecutive_skips}: arrays of their own, still readable after
        params and opt_state have been donated to the next step."""
        loss, grads, figures = self.gradients(params, micro_batches, with_figures=True)
        train, frozen = self.split(params)
        with jax.set_mesh(self.mesh):
            train, opt_state, stats = self._apply(train, opt_state, grads)
        if self.moe is not None:
            stats = {**stats, **moe_metrics(figures, self.moe.capacity_factor is not None)}
        return {**frozen, **train}, opt_state, loss, stats

    def eval_loss(self, params, micro_batches: list[MicroBatch]) -> jax.Array:
        with jax.set_mesh(self.mesh):
            return sum((self._eval(params, b) for b in micro_batches), jnp.zeros((), jnp.float32))

    def lower_grad(self, params, example_batch):
        """The grad micro-step lowered for this batch shape (jax.stages.Lowered: .as_text(), .compile()).
        `params` (all of them, trainable and frozen) and the batch may be arrays or ShapeDtypeStructs."""
        train, frozen = self.split(params)
        acc = jax.eval_shape(self._zeros, train)
        with jax.set_mesh(self.mesh):
            return self._grad.lower(train, frozen, acc, example_batch, jax.ShapeDtypeStruct((), jnp.float32))

    def lower_update(self, params, opt_state):
        """The optimizer update lowered (arrays or ShapeDtypeStructs), for its compiled memory analysis."""
        train, _ = self.split(params)
        with jax.set_mesh(self.mesh):
            return self._apply.lower(train, opt_state, jax.eval_shape(self._zeros, train))

    def memory_analysis(self, params, opt_state, example_batch) -> dict:
        """Per-device bytes of the compiled grad step (XLA's memory analysis): arguments, outputs, temporaries."""
        stats = self.lower_grad(params, example_batch).compile().memory_analysis()
        if stats is None:
            return {}
        return {
            "argument_bytes": int(stats.argument_size_in_bytes),
            "output_bytes": int(stats.output_size_in_bytes),
            "temp_bytes": int(stats.temp_size_in_bytes),
        }


def with_capacity_factor(model: Decoder, capacity_factor: float) -> Decoder:
    """The same model (the same parameter arrays) whose MoE layers dispatch with `capacity_factor`."""
    copy = nnx.merge(*nnx.split(model))
    config = copy.config
    copy.config = dataclasses.replace(config, moe=dataclasses.replace(config.moe, capacity_factor=capacity_factor))
    return copy


@partial(jax.jit, static_argnames="capacity")
def moe_metrics(figures: dict, capacity: bool) -> dict:
    """A step's summed MoE figures -> what is logged with it: the router losses (before coefficients); the
    expert load from the tokens per expert [L_sparse, E]: the most and the mean tokens per expert (over
    experts, then the worst / the mean over layers) and their ratio in the worst layer (1 = perfectly
    balanced); with capacity-bounded dispatch, the assignments dropped (all layers) and their fraction."""
    load = figures["load"]
    top, mean = jnp.max(load, axis=-1), jnp.mean(load, axis=-1)
    out = {"aux_loss": figures["aux_loss"], "z_loss": figures["z_loss"], "expert_load_max": jnp.max(top),
           "expert_load_mean": jnp.mean(mean), "expert_load_imbalance": jnp.max(top / jnp.maximum(mean, 1e-9))}
    if capacity:  # load counts every real assignment (top-k per token and sparse layer), dropped or not
        out["moe_dropped"] = figures["dropped"]
        out["moe_dropped_fraction"] = figures["dropped"] / jnp.maximum(jnp.sum(load), 1.0)
    return out

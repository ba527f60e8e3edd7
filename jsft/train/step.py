"""The jitted train and eval steps, with declared in/out shardings and donated buffers.

One optimizer step = `grad_step` once per micro-batch (gradients summed into a float32 accumulator that
lives sharded like the parameters) + `apply_step` once. Each micro-batch carries its target slots with
weights that already hold the global normalisation (see loss.py and batch.py), so the summed gradient is
the exact gradient of the global batch's loss, however the batch was split into micro-batches, devices or
hosts. The micro-batch count follows the data, so accumulation is a Python loop over compiled programs
(one per micro-batch shape, see trainer.shape_buckets), not a scan that would recompile for every count.
Only the trainable parameters (all, or the LoRA adapters: lora.trainable_names) are differentiated,
accumulated and optimised; the frozen rest is a plain input of the grad step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jsft.data.batch import MicroBatch
from jsft.models.decoder import Decoder
from jsft.models.lora import trainable_names
from jsft.models.params import param_arrays, param_shardings, replace_params
from jsft.sharding import row_sharding
from jsft.train.feeders import mesh_feeders
from jsft.train.loss import weighted_nll
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
        offload_opt_state: bool = False,
    ):
        self.template = model  # structure and static config; parameters are passed as a flat dict
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
            in_shardings=(self.param_shardings, self.frozen_shardings, self.param_shardings, self.row_sharding),
            out_shardings=(self.param_shardings, replicated, replicated),
            donate_argnums=(2,),
        )
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

    def _loss_and_load(self, params, batch: MicroBatch):
        """(sum(target_weight * nll) over the micro-batch, the weights carrying the global normalisation;
        tokens routed to each expert [L_sparse, E], an exact sum over micro-batches and devices, or [0, 0]
        for a dense model)."""
        model = replace_params(self.template, params)
        hidden, _, moe_stats = model.hidden_states_and_stats(batch.input_ids, batch.positions, batch.segment_ids)
        loss = weighted_nll(hidden, model.unembed(), batch, self.chunk_size, model.config.final_logit_softcapping)
        load = jnp.zeros((0, 0), jnp.float32) if moe_stats is None else moe_stats.expert_counts
        return loss, load

    def _weighted_loss(self, params, batch: MicroBatch) -> jax.Array:
        return self._loss_and_load(params, batch)[0]

    def _grad_step(self, params, frozen, acc, batch):
        (loss, load), grads = jax.value_and_grad(lambda p: self._loss_and_load({**frozen, **p}, batch), has_aux=True)(params)
        acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads)
        return acc, loss, load

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

    def gradients(self, params, micro_batches: list[MicroBatch], with_load: bool = False):
        """(loss, summed float32 gradients of the trainable parameters) of one global batch given as device
        micro-batches; `with_load`: and the tokens routed to each expert [L_sparse, E] over the batch."""
        params, frozen = self.split(params)
        with jax.set_mesh(self.mesh):  # traced under the mesh, so block-boundary constraints keep rows split
            acc = self._zeros(params)
            loss = jnp.zeros((), jnp.float32)
            load = None
            for batch in micro_batches:
                acc, micro_loss, micro_load = self._grad(params, frozen, acc, batch)
                loss = loss + micro_loss
                load = micro_load if load is None else load + micro_load
        return (loss, acc, load) if with_load else (loss, acc)

    def train_step_stats(self, params, opt_state, micro_batches: list[MicroBatch]):
        """One optimizer step, dispatched without waiting; returns (params, opt_state, loss, stats) with
        stats {grad_norm, lr, skipped_steps, consecutive_skips}: arrays of their own, still readable after
        params and opt_state have been donated to the next step."""
        loss, grads, load = self.gradients(params, micro_batches, with_load=True)
        train, frozen = self.split(params)
        with jax.set_mesh(self.mesh):
            train, opt_state, stats = self._apply(train, opt_state, grads)
        if load is not None and load.size:
            stats = {**stats, **expert_load_metrics(load)}
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
            return self._grad.lower(train, frozen, acc, example_batch)

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


@jax.jit
def expert_load_metrics(load) -> dict:
    """Tokens per expert [L_sparse, E] of a step -> the load summary logged with it: the most and the mean
    tokens per expert (over experts, then the worst / the mean over layers), and their ratio in the worst
    layer (1 = perfectly balanced)."""
    top, mean = jnp.max(load, axis=-1), jnp.mean(load, axis=-1)
    return {"expert_load_max": jnp.max(top), "expert_load_mean": jnp.mean(mean),
            "expert_load_imbalance": jnp.max(top / jnp.maximum(mean, 1e-9))}

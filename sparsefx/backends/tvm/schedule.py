"""Default schedules: what TIR gets when nothing was tuned for it.

GPU: TVM's DLight rules (matmul, GEMV, reductions, fallback). CPU: DLight's GEMV (where
the reduction is the longer side, see `ReductionHeavyGEMV`), `RowSum` for a lone reduction over
whole rows, DLight's reduction rule, then
`CPUFallback`, which inlines element-wise chains and runs every
remaining loop nest parallel over the cores and vectorised over the SIMD width instead
of TVM's untuned serial loops.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

PARALLEL_GRAIN = 64  # spatial iterations per parallel task: keeps small tensors serial


class _VectorRule(CPUScheduleRule):
    """A CPU rule that vectorises `vector_lanes` wide."""

    def __init__(self, vector_lanes: int = 16) -> None:
        self.vector_lanes = vector_lanes

    def _blocks(self, func: tirx.PrimFunc, target: tvm.target.Target) -> tuple[s_tir.Schedule, list] | None:
        """A schedule of `func` and its normalised blocks, or None where this rule cannot apply."""
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        blocks = normalize_prim_func(sch)
        return None if blocks is None else (sch, blocks)


class CPUFallback(_VectorRule):
    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, _: bool) -> s_tir.Schedule | None:
        if (found := self._blocks(func, target)) is None:
            return None
        sch, blocks = found
        blocks = try_inline(sch, blocks)
        reductions = []
        for info in blocks:
            block = info.block_rv
            loops = sch.get_loops(block)
            if not loops:
                continue
            kinds = info.dom_kind()
            spatial = [loop for loop, kind in zip(loops, kinds, strict=False) if kind == "S"]
            reduce = [loop for loop, kind in zip(loops, kinds, strict=False) if kind == "R"]
            if not spatial or len(spatial) + len(reduce) != len(loops):
                continue
            sch.reorder(*spatial, *reduce)
            fused = sch.fuse(*spatial)
            extent = sch.get(fused).extent
            if reduce:
                reductions.append((block, reduce[0]))
                if isinstance(extent, tirx.IntImm) and extent.value >= 2:
                    sch.parallel(fused)
                continue
            if isinstance(extent, tirx.IntImm) and extent.value % self.vector_lanes == 0 \
                    and extent.value >= self.vector_lanes * 2:
                outer, inner = sch.split(fused, [None, self.vector_lanes])
                sch.vectorize(inner)
                if extent.value >= self.vector_lanes * PARALLEL_GRAIN:
                    sch.parallel(outer)
            elif isinstance(extent, tirx.IntImm) and extent.value >= PARALLEL_GRAIN:
                sch.parallel(fused)
        for block, loop in reductions:
            sch.decompose_reduction(block, loop)
        return sch


class RowSum(_VectorRule):
    """A lone reduction over whole rows (global average pooling, a mean over the last axes), summed
    in `vector_lanes` partial sums (rfactor) so the row is read in vectors. DLight's CPU rule adds one
    element at a time, each add waiting on the last: 7 GB/s on EfficientNet-B0's squeeze-excite pools
    (72 x 56x56: 0.13 ms), a quarter of what one core reads from L2."""

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, _: bool) -> s_tir.Schedule | None:
        if (found := self._blocks(func, target)) is None:
            return None
        sch, blocks = found
        reductions = [b for b in blocks if "R" in b.dom_kind()]
        if len(reductions) != 1:
            return None
        info = reductions[0]
        kinds, doms = info.dom_kind(), info.dom()
        split = kinds.index("R")
        if "S" in kinds[split:] or not all(isinstance(d, (int, tirx.IntImm)) for d in doms[split:]):
            return None
        extent = 1
        for d in doms[split:]:
            extent *= int(d)
        row = sch.get(info.block_rv).reads[0].source.shape[-1]
        if extent % self.vector_lanes or extent < 4 * self.vector_lanes or not isinstance(row, tirx.IntImm) \
                or int(row) != int(doms[-1]):
            return None
        loops = sch.get_loops(info.block_rv)
        if split:
            sch.fuse(*loops[:split])
        _, lanes = sch.split(sch.fuse(*sch.get_loops(info.block_rv)[-len(kinds) + split:]), [None, self.vector_lanes])
        partial = sch.rfactor(lanes, factor_axis=split)
        *spatial, outer, lanes = sch.get_loops(partial)
        if spatial and int(sch.get(spatial[0]).extent) >= PARALLEL_GRAIN:
            sch.parallel(spatial[0])  # before the init is split off: then the loop is no longer one reduction
        sch.vectorize(lanes)
        sch.decompose_reduction(partial, outer)
        return sch


class ReductionHeavyGEMV(dlight.cpu.GEMV):
    """DLight's CPU GEMV rule, only where the reduction is at least as long as the output. Where
    the output is longer (an SE block's expanding 1x1 conv, 48 -> 1152 channels at 1x1) it
    vectorises 128 lanes wide and unrolls the reduction 256 steps, and LLVM spent over ten
    minutes on that one kernel; `CPUFallback` runs 28 -> 672 in 0.0045 ms against its 0.0050."""

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, tunable: bool) -> s_tir.Schedule | None:
        if isinstance(func, tirx.PrimFunc) and _output_longer_than_reduction(func):
            return None
        return super().apply(func, target, tunable)


def _output_longer_than_reduction(func: tirx.PrimFunc) -> bool:
    """Whether the first reduction block's spatial extent exceeds its reduction extent (symbolic
    extents count as 1)."""
    blocks = normalize_prim_func(s_tir.Schedule(func)) or []
    info = next((b for b in blocks if "R" in b.dom_kind()), None)
    if info is None:
        return False
    extents = {"S": 1, "R": 1}
    for kind, dom in zip(info.dom_kind(), info.dom(), strict=True):
        extents[kind] *= int(dom) if isinstance(dom, (int, tirx.IntImm)) else 1
    return extents["S"] > extents["R"]


def default_schedule_pass(target: tvm.target.Target, vector_bits: int = 512) -> tvm.transform.Pass:
    if "gpu" in target.keys:
        rules = [dlight.gpu.Matmul(), dlight.gpu.GEMV(), dlight.gpu.Reduction(), dlight.gpu.GeneralReduction(),
                 dlight.gpu.Fallback()]
    else:
        lanes = max(vector_bits // 32, 4)
        rules = [ReductionHeavyGEMV(), RowSum(lanes), dlight.cpu.Reduction(), CPUFallback(lanes)]
    return dlight.ApplyDefaultSchedule(*rules)

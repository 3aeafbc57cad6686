"""A post-compile pass over a kernel's SASS: let the warp scheduler interleave the FP32 promotion
with the other warpgroup's tensor-core work.

The promotion after each 128-wide K block is a long run of FFMAs. ptxas marks many of them to keep
an operand in the register reuse cache for the next instruction, which also keeps the warp from
yielding the issue slot mid-run, so the other math warpgroup waits to issue its WGMMAs. This pass
clears the reuse flag and sets yield on FFMAs of the first part of each run (the technique
DeepGEMM describes for its FP8 GEMMs), in place in the cubin. The instructions compute the same
values: only scheduling hints change.

Volta-and-later encodings put the scheduling controls in the top bits of each 128-bit instruction:
in the high 64-bit word, bit 45 is the yield flag (stored inverted: 0 lets the warp yield) and bits
58-61 the operand reuse flags (59: operand B).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

YIELD_INVERTED_BIT = 1 << 45
REUSE_B_BIT = 1 << 59
MIN_RUN = 16  # shorter FFMA runs are not promotions
INTERLEAVED_SHARE = 9 / 16  # leading share of a run whose instructions may yield

_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;\s*/\*\s*(0x[0-9a-f]{16})\s*\*/\s*$")
_HIGH_WORD = re.compile(r"^\s*/\*\s*(0x[0-9a-f]{16})\s*\*/\s*$")
_FUNCTION = re.compile(r"^\s*Function\s*:")


@dataclass
class Instruction:
    text: str
    low: int
    high: int

    @property
    def is_ffma(self) -> bool:
        return self.text.split()[0].split(".")[0] == "FFMA" if self.text else False

    @property
    def destination(self) -> str:
        return self.text.split()[1].rstrip(",")

    def encoding(self, high: int | None = None) -> bytes:
        return self.low.to_bytes(8, "little") + (self.high if high is None else high).to_bytes(8, "little")


def parse(sass: str) -> list[list[Instruction]]:
    """The instructions of each function in ``cuobjdump -sass`` output, in address order."""
    functions: list[list[Instruction]] = []
    pending: tuple[str, int] | None = None
    for line in sass.splitlines():
        if _FUNCTION.match(line):
            functions.append([])
            pending = None
            continue
        match = _INSTRUCTION.match(line)
        if match and functions:
            pending = (re.sub(r"^@!?U?P\w+\s+", "", match.group(2)), int(match.group(3), 16))
            continue
        match = _HIGH_WORD.match(line)
        if match and pending is not None:
            functions[-1].append(Instruction(pending[0], pending[1], int(match.group(1), 16)))
            pending = None
    return functions


def _ffma_runs(instructions: list[Instruction]) -> list[list[Instruction]]:
    runs, current = [], []
    for instruction in instructions + [Instruction("", 0, 0)]:
        if instruction.is_ffma:
            current.append(instruction)
            continue
        if len(current) >= MIN_RUN:
            runs.append(current)
        current = []
    return runs


def _interleaved(run: list[Instruction]) -> list[int]:
    """New high words of a run's instructions: in its leading share, an FFMA that would keep operand
    B for the next instruction may yield instead, when it starts a new destination or continues the
    previous instruction's (so a reuse chain is never cut in the middle)."""
    highs, seen = [], set()
    previous_reuse, previous_destination = False, None
    for index, instruction in enumerate(run):
        high = instruction.high
        reuse = bool(high & REUSE_B_BIT)
        leading = index < int(len(run) * INTERLEAVED_SHARE)
        if leading and reuse and high & YIELD_INVERTED_BIT and (
                instruction.destination not in seen
                or (previous_reuse and instruction.destination == previous_destination)):
            high ^= REUSE_B_BIT | YIELD_INVERTED_BIT
            reuse = False
        seen.add(instruction.destination)
        previous_reuse, previous_destination = reuse, instruction.destination
        highs.append(high)
    return highs


def interleave_ffma(cubin: bytes, sass: str) -> tuple[bytes, int]:
    """``cubin`` with its promotion FFMAs allowed to yield; ``sass`` is its disassembly. Returns the
    patched cubin and the number of instructions changed. Each run is located by its exact
    encoding, so a run that cannot be found unambiguously is left alone."""
    patched = bytearray(cubin)
    changed = 0
    for function in parse(sass):
        for run in _ffma_runs(function):
            original = b"".join(i.encoding() for i in run)
            at = patched.find(original)
            if at < 0 or patched.find(original, at + 1) >= 0:
                continue
            highs = _interleaved(run)
            patched[at:at + len(original)] = b"".join(i.encoding(h) for i, h in zip(run, highs, strict=True))
            changed += sum(h != i.high for i, h in zip(run, highs, strict=True))
    return bytes(patched), changed

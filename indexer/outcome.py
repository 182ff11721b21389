"""How an encode run ended: what it encoded and skipped (`EncodeSummary`), the share of the
selection that may be missing (`--max-skipped`), and the errors a run that did not end well raises.

Skips are one-line messages ('<where>: <problem>'); their kind (`skip_reason`) is the problem
without its details, so a run can say "3 skipped: 2 missing band file, 1 invalid pixel(s)" and
tell a server that did not answer (read again by the next run: `transient`) from a bad file.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rsretrieve.bands import Modality
from rsretrieve.errors import RSRetrieveError

MAX_FAILED_SHARE = 0.05  # share of a selection's patches that may be unreadable (--max-skipped; nodata windows are not failures)
DATA_GAP = "invalid pixel(s)"  # a window with nodata: the data has a gap, nothing is broken
UNREACHABLE = "cannot be reached"  # the way to the data failed (io.remote): read again on the next run


def skip_reason(message: str) -> str:
    """The kind of problem in a one-line skip message ('<where>: <problem>'): the problem without
    its window, its closing details in parentheses and its numbers ('missing band file',
    'unreadable GeoTIFF', 'invalid pixel(s)')."""
    problem = message.split(": ", 1)[-1]
    problem = re.sub(r"^window [\d,]+: ", "", problem)
    problem = re.sub(r"\s*\([^()]*(\([^()]*\)[^()]*)*\)$", "", problem)
    return re.sub(r"\b\d+\b\s*", "", problem).strip()


def skip_counts(skipped: list[tuple[str, str]]) -> Counter:
    return Counter(skip_reason(message) for _, message in skipped)


def transient(message: str) -> bool:
    """Whether a skip is the way to the data failing (a server error, a timeout): the next run reads
    its chunk again by itself; a bad file stays skipped until `--retry-skipped`."""
    return UNREACHABLE in skip_reason(message)


def skip_text(by_reason: dict[str, int], examples: list[str]) -> str:
    """'3 skipped: 2 missing band file, 1 invalid pixel(s); first: <path>: <problem>; ...'."""
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(by_reason.items(), key=lambda item: -item[1]))
    return f"{sum(by_reason.values())} skipped: {reasons}; first: {'; '.join(examples)}"


@dataclass
class EncodeSummary:
    modality: Modality
    store: Path
    chunks_total: int
    chunks_already_done: int
    chunks_encoded: int = 0
    patches_encoded: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    provenance: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # e.g. a subset count that differs from the paper's
    retry: dict[str, dict[str, int]] = field(default_factory=dict)  # chunks with patches that could not be reached: their skips
    patches_total: int = 0
    converted: list[tuple[str, str]] = field(default_factory=list)  # (patch_id, what the reader converted)

    def conversion_note(self) -> str | None:
        """'converted on reading: 18 patches: S1 integer dB converted to float32' (one line), or None."""
        if not self.converted:
            return None
        counts = Counter(what for _, what in self.converted)
        return "converted on reading: " + ", ".join(f"{n} patch{'es' if n != 1 else ''}: {what}" for what, n in counts.most_common())

    def skip_summary(self, examples: int = 3) -> str:
        """'3 skipped: 2 missing band file, 1 invalid pixel(s) ...; first: <path>, ...' (one line)."""
        return skip_text(skip_counts(self.skipped), [message for _, message in self.skipped[:examples]])

    @property
    def patches_per_second(self) -> float:
        return self.patches_encoded / self.seconds if self.seconds > 0 else 0.0

    @property
    def nothing_to_do(self) -> bool:
        return self.chunks_already_done == self.chunks_total


class EncodeFailed(RSRetrieveError):
    """An encode that did not end well, with the summary of what it did."""

    def __init__(self, message: str, summary: EncodeSummary):
        super().__init__(message)
        self.summary = summary


class TooManySkipped(EncodeFailed):
    """Every patch of a modality, or more than the allowed share of them, could not be read. What
    was encoded stays in the store; the message says what was skipped and why."""


class EncodeInterrupted(EncodeFailed):
    """The run stopped (a task failed, or Ctrl-C); what was written stays valid and resumable."""


class EncodeCancelled(EncodeInterrupted):
    """Ctrl-C: the CLI exits 130, the shell's code for an interrupt."""

    exit_code = 130


def check_skipped(store: EmbeddingStore, modality: Modality, summary: EncodeSummary, max_share: float) -> None:
    """TooManySkipped when the store holds no patch of the modality, or when more than `max_share`
    of the selection's patches are not in it (unreadable; nodata windows, a gap in the data rather
    than a failure, do not count). Counted over the whole selection on every run, so a run says
    the same as the one before it until the data or `max_share` changes."""
    label = modality.upper()
    recorded = store.skipped(modality)
    by_reason = recorded.get("by_reason", {}) or skip_counts(summary.skipped)
    examples = [m for _, m in summary.skipped[:3]] or list(recorded.get("examples", []))[:3]
    why = skip_text(by_reason, examples) if by_reason else "no reason recorded"
    valid, total = store.valid_count(modality), summary.patches_total
    if valid == 0:
        raise TooManySkipped(f"{label}: none of the {total} patches could be encoded: {why}", summary)
    gaps = min(sum(n for reason, n in by_reason.items() if DATA_GAP in reason), total - valid)
    missing = total - valid - gaps
    if total and missing / total > max_share:
        raise TooManySkipped(f"{label}: {missing} of {total} patches ({missing / total:.0%}) could not be read, more than the "
                             f"{max_share:.0%} allowed ({why}); the others are in the store — fix the files and run "
                             f"`rsretrieve encode --retry-skipped`, or accept the gap with --max-skipped {_share_text(missing / total)}",
                             summary)


def _share_text(share: float) -> str:
    """The smallest two-decimal fraction at or above `share` (what --max-skipped must be at least)."""
    return f"{min(1.0, -(-round(share * 100, 6) // 1) / 100):.2f}"

"""Skipped patches: why each was skipped (its reason, from the reader's one-line message), which
skips the next run retries by itself, and when too many of a selection's patches are missing for a
run to end well (`too_many_skipped`: `indexer.pipeline` raises it)."""

from __future__ import annotations

import re
from collections import Counter

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


def too_many_skipped(store, modality: str, summary, max_share: float) -> str | None:
    """Why a run ends badly (`TooManySkipped`'s message), or None: the store holds no patch of the
    modality, or more than `max_share` of the selection's patches are not in it (unreadable; nodata
    windows, a gap in the data rather than a failure, do not count). Counted over the whole selection on every run, so a run says
    the same as the one before it until the data or `max_share` changes."""
    label = modality.upper()
    recorded = store.skipped(modality)
    by_reason = recorded.get("by_reason", {}) or skip_counts(summary.skipped)
    examples = [m for _, m in summary.skipped[:3]] or list(recorded.get("examples", []))[:3]
    why = skip_text(by_reason, examples) if by_reason else "no reason recorded"
    valid, total = store.valid_count(modality), summary.patches_total
    if valid == 0:
        return f"{label}: none of the {total} patches could be encoded: {why}"
    gaps = min(sum(n for reason, n in by_reason.items() if DATA_GAP in reason), total - valid)
    missing = total - valid - gaps
    if total and missing / total > max_share:
        return (f"{label}: {missing} of {total} patches ({missing / total:.0%}) could not be read, more than the "
                f"{max_share:.0%} allowed ({why}); the others are in the store — fix the files and run "
                f"`rsretrieve encode --retry-skipped`, or accept the gap with --max-skipped {_share_text(missing / total)}")
    return None


def _share_text(share: float) -> str:
    """The smallest two-decimal fraction at or above `share` (what --max-skipped must be at least)."""
    return f"{min(1.0, -(-round(share * 100, 6) // 1) / 100):.2f}"

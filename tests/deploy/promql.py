"""Metric names in PromQL expressions, and the metric names LineWatch exports.

A small tokenizer, not a full PromQL parser: it removes string literals, label matchers,
range/subquery brackets, grouping clauses, numbers and Grafana variables, then every
remaining identifier that is not a PromQL function, aggregation or keyword is a metric
name. An unknown identifier followed by ``(`` is reported as an unknown function.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_FUNCTION_WORDS = """
abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes clamp
clamp_max clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year days_in_month
deg delta deriv double_exponential_smoothing exp floor histogram_avg histogram_count
histogram_fraction histogram_quantile histogram_stddev histogram_stdvar histogram_sum
holt_winters hour idelta increase info irate label_join label_replace last_over_time ln log10
log2 mad_over_time max_over_time min_over_time minute month pi predict_linear
present_over_time quantile_over_time rad rate resets round scalar sgn sin sinh sort
sort_by_label sort_by_label_desc sort_desc sqrt stddev_over_time stdvar_over_time
sum_over_time tan tanh time timestamp vector year
"""
_AGGREGATION_WORDS = (
    "avg bottomk count count_values group limit_ratio limitk max min quantile stddev stdvar "
    "sum topk"
)
_KEYWORD_WORDS = (
    "and or unless bool offset by without on ignoring group_left group_right inf nan"
)
FUNCTIONS = frozenset(_FUNCTION_WORDS.split())
AGGREGATIONS = frozenset(_AGGREGATION_WORDS.split())
KEYWORDS = frozenset(_KEYWORD_WORDS.split())

_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
_OFFSET = re.compile(r"\boffset\s+-?[0-9smhdwy]+", re.IGNORECASE)
_VARIABLE = re.compile(r"\$\{?\w+\}?")
_NUMBER = re.compile(r"(?<![\w:])(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*(\s*\()?")


class PromQLNameError(ValueError):
    """An identifier used as a function that PromQL does not have."""


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (``rate(x_total[5m])`` -> ``{"x_total"}``)."""
    text = _STRING.sub('""', expr)
    text = _VARIABLE.sub(" ", text)
    text = _MATCHERS.sub(" ", text)
    text = _BRACKETS.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _OFFSET.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    names: set[str] = set()
    for match in _IDENT.finditer(text):
        ident = match.group(0).rstrip("( \t\n")
        called = match.group(1) is not None
        low = ident.lower()
        if low in KEYWORDS:
            continue
        if called:
            if ident not in FUNCTIONS and low not in AGGREGATIONS:
                raise PromQLNameError(f"unknown PromQL function {ident!r} in {expr!r}")
            continue
        if low in AGGREGATIONS:  # `sum without (x) (...)` leaves `sum` after grouping removal
            continue
        names.add(ident)
    return names


_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:([A-Za-z_:][\w:]*)\s*(?:\{[^}]*\})?\s*,)?"
                           r"\s*([A-Za-z_]\w*)\s*\)\s*$")


def label_values_metric(query: str) -> tuple[str | None, str]:
    """(metric or None, label) of a Grafana ``label_values(metric, label)`` query."""
    match = _LABEL_VALUES.match(query)
    if not match:
        raise ValueError(f"not a label_values(metric, label) query: {query!r}")
    return match.group(1), match.group(2)


def exported_names(prefix: str = "linewatch_") -> set[str]:
    """Every series name LineWatch's /metrics can expose, with the client's suffixes."""
    from prometheus_client import REGISTRY

    import service.telemetry.metrics  # noqa: F401  (registers the metrics)

    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
        "summary": ("", "_count", "_sum", "_created"),
        "info": ("_info",),
        "stateset": ("",),
        "gauge": ("",),
        "unknown": ("",),
    }
    names: set[str] = set()
    for family in REGISTRY.collect():
        if family.name.startswith(prefix):
            names.update(family.name + s for s in suffixes[family.type])
    return names


def unknown_names(exprs: Iterable[str], allowed: set[str]) -> dict[str, set[str]]:
    """{expr: names it uses that are not in ``allowed``}, only for exprs that have some."""
    out: dict[str, set[str]] = {}
    for expr in exprs:
        missing = metric_names(expr) - allowed
        if missing:
            out[expr] = missing
    return out

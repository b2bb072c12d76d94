"""How the widgets write tokens and colour experts, in one place: the feature browser, the router
inspector and the notebooks' matplotlib figures share it (no Panel here, so figures need none).

Tokens come as :func:`~workbench.eval.features.readable_tokens` gives them: a word's first piece with
the space it stands after (" the"), a continuation piece bare ("ing"). Ids are written as plain
integers everywhere ("1024").
"""
from __future__ import annotations

import colorsys

EXPERT_PALETTE = (
    "#e69f00", "#56b4e9", "#009e73", "#f0e442", "#0072b2", "#d55e00", "#cc79a7", "#aa0033",
    "#66ffee", "#006666", "#aacc99", "#7777ff", "#cc0088", "#ee5566", "#ffbbcc", "#5511ee",
)
"""16 categorical colours, one per expert. The first seven are Okabe and Ito's colour-blind-safe set
(orange, sky blue, bluish green, yellow, blue, vermillion, reddish purple; their black left out, as
no background for text); each further one is the sRGB colour (steps of 0x11, CIELAB lightness 35
to 92, chroma at least 25: no greys) farthest from those already chosen, by the least of the
CIEDE2000 distances in normal vision and 1.5 times those in simulated deuteranopia and protanopia
(Machado et al. 2009), taken in that order. Any two of the 16 differ by at least 22 CIE76 units
(tab20's closest pair: 17); the first eight stay at least 17 apart for a deuteranope and 20 for a
protanope (tab20's first eight: 7 and 5). Black or white text reads on each at a WCAG contrast of
at least 5.1 (:func:`text_color`)."""
_GOLDEN = 0.381966  # 1 - 1/phi: successive hues never land close to each other
_LIGHTNESS = (0.80, 0.68, 0.88)
SEAM = "box-shadow:inset 1px 0 0 #8a8a8a"
"""The thin line drawn between a word's pieces, as the feature browser draws it."""


def expert_colors(n_experts: int) -> list[str]:
    """A distinct colour (hex) per expert: :data:`EXPERT_PALETTE` for the first 16, then hues a
    golden angle apart (lightness cycling through three levels) for any further ones, which no
    palette can keep apart by colour alone (the legend and the hover give their numbers). An
    expert's colour does not depend on ``n_experts``."""
    colors = list(EXPERT_PALETTE[:n_experts])
    e = 0
    while len(colors) < n_experts:
        r, g, b = colorsys.hls_to_rgb((e * _GOLDEN) % 1.0, _LIGHTNESS[e % len(_LIGHTNESS)], 0.65)
        color = f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"
        if color not in colors:
            colors.append(color)
        e += 1
    return colors


def text_color(background: str) -> str:
    """Black or white, whichever has the higher WCAG contrast on the ``background`` hex colour."""
    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4
    r, g, b = (linear(int(background[i:i + 2], 16) / 255) for i in (1, 3, 5))
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return "#000000" if (luminance + 0.05) / 0.05 >= 1.05 / (luminance + 0.05) else "#ffffff"


def token_label(token: str) -> str:
    """A token shown on its own (a list, a table cell): without the space that starts a word, and
    whitespace made visible (a newline, a lone space)."""
    stripped = token.strip()
    if stripped:
        return stripped
    return token.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥") or "∅"


def continues_word(tokens: list[str], t: int) -> bool:
    """Whether token t of running text goes on the word before it (a WordPiece continuation, a BPE
    piece without a leading space) rather than starting a word: the feature browser's rule, whose
    continuation pieces carry ``data-cont="1"`` and are drawn joined to the token before, with a
    thin seam."""
    return t > 0 and not tokens[t][:1].isspace() and not tokens[t - 1][-1:].isspace() and tokens[t] != ""

"""The built-in loopterm themes, as plain data.

Each entry has exactly the shape of a user theme file (see ``loopterm.themes.user``)
and goes through the same validation, so a user can copy one of these into
``<config dir>/themes/NAME.toml`` as a starting point.

Rules every palette keeps (``tests/test_themes.py`` checks them):

* success, warning and error are three different colours;
* every colour a status is drawn in (see ``STATUS_GLYPHS``) reads as text on the
  theme's background, surface and panel: WCAG contrast at least 4.5:1, and at
  least 7:1 in ``loopterm-high-contrast``;
* colour never carries meaning alone: the status glyphs do that.
"""

from __future__ import annotations

from typing import Any

DEFAULT_THEME = "loopterm-dark"

# Text styled "dim" in rich renderables (the timeline's cells) is drawn by loopterm (Textual's DimFilter) this
# far from the background towards its colour, instead of being left to the terminal (most draw it at about
# half, which no light background and no coloured cursor row reads at 4.5:1). Widgets that render Textual
# Content (the tree, Statics) resolve dim themselves. tests/test_contrast.py measures both as painted.
DIM_FACTOR = 0.85

BUILTIN_THEME_DATA: dict[str, dict[str, Any]] = {
    "loopterm-dark": {
        "name": "loopterm-dark",
        "dark": True,
        "primary": "#58A6FF",
        "secondary": "#BC8CFF",
        "accent": "#F0883E",
        "foreground": "#E6EDF3",
        "background": "#0D1117",
        "surface": "#161B22",
        "panel": "#21262D",
        "success": "#3FB950",
        "warning": "#D29922",
        "error": "#F85149",
        "variables": {
            "block-cursor-text-style": "bold",
            "footer-key-foreground": "#58A6FF",
            "input-selection-background": "#58A6FF 35%",
            # A deep blue cursor with white text: dim text on the selected row still reads (4.5:1).
            "block-cursor-background": "#1A3D6B",
            "block-cursor-foreground": "#FFFFFF",
        },
    },
    "loopterm-light": {
        "name": "loopterm-light",
        "dark": False,
        "primary": "#0550AE",
        "secondary": "#6639BA",
        "accent": "#A4460A",
        "foreground": "#1F2328",
        "background": "#FFFFFF",
        "surface": "#F6F8FA",
        "panel": "#EDF0F3",
        "success": "#116329",
        "warning": "#8A5C00",
        "error": "#CF222E",
        "variables": {
            "block-cursor-text-style": "bold",
            "footer-key-foreground": "#0550AE",
            "input-selection-background": "#0550AE 25%",
            # Muted text 6:1 on white (Textual's default, the foreground at 60%, is 4.3:1).
            "text-muted": "#57606A",
            "foreground-muted": "#57606A",
            # The selected row, focused or not, keeps its dim text readable (the default was 2.8:1).
            "block-cursor-background": "#033D8B",
            "block-cursor-foreground": "#FFFFFF",
            "block-cursor-blurred-background": "#DDE7F5",
            "block-cursor-blurred-foreground": "#1F2328",
            "block-hover-background": "#E6EAEF",
        },
    },
    # Pure black and white; every meaningful colour is bright and saturated, at
    # least 7:1 against black. No grey carries meaning: muted text, blurred
    # cursors, borders and selections are drawn in full white/black.
    "loopterm-high-contrast": {
        "name": "loopterm-high-contrast",
        "dark": True,
        "primary": "#00FFFF",
        "secondary": "#FF99FF",
        "accent": "#FFB000",
        "foreground": "#FFFFFF",
        "background": "#000000",
        "surface": "#000000",
        "panel": "#000000",
        "boost": "#000000",
        "success": "#00FF00",
        "warning": "#FFFF00",
        "error": "#FF6B6B",
        "luminosity_spread": 0.0,
        "text_alpha": 1.0,
        "variables": {
            "text": "#FFFFFF",
            "text-muted": "#FFFFFF",
            "foreground-muted": "#FFFFFF",
            "block-cursor-foreground": "#000000",
            "block-cursor-background": "#FFFFFF",
            "block-cursor-text-style": "bold",
            "block-cursor-blurred-foreground": "#FFFFFF",
            "block-cursor-blurred-background": "#000000",
            "block-cursor-blurred-text-style": "bold underline",
            "block-hover-background": "#000000",
            "border": "#FFFF00",
            "border-blurred": "#FFFFFF",
            "surface-active": "#000000",
            "scrollbar": "#FFFFFF",
            "scrollbar-hover": "#FFFF00",
            "scrollbar-active": "#00FFFF",
            "scrollbar-background": "#000000",
            "scrollbar-background-hover": "#000000",
            "scrollbar-background-active": "#000000",
            "scrollbar-corner-color": "#000000",
            "footer-foreground": "#FFFFFF",
            "footer-background": "#000000",
            "footer-key-foreground": "#FFFF00",
            "footer-description-foreground": "#FFFFFF",
            "input-cursor-foreground": "#000000",
            "input-cursor-background": "#FFFFFF",
            "input-selection-foreground": "#000000",
            "input-selection-background": "#FFFFFF",
            "screen-selection-foreground": "#000000",
            "screen-selection-background": "#FFFFFF",
            "link-color": "#00FFFF",
            "link-color-hover": "#000000",
            "link-background-hover": "#00FFFF",
            "markdown-h6-color": "#FFFFFF",
            "button-color-foreground": "#000000",
        },
    },
    # Okabe & Ito's colour-universal-design palette (Okabe and Ito, 2008):
    # success is sky blue, error vermillion, warning yellow, so outcomes differ
    # in hue along the blue-yellow axis that protanopes and deuteranopes keep,
    # and error and warning also differ strongly in luminance.
    "loopterm-colorblind": {
        "name": "loopterm-colorblind",
        "dark": True,
        "primary": "#CC79A7",  # reddish purple
        "secondary": "#2EC4A0",  # bluish green (#009E73), lightened to read as text
        "accent": "#E69F00",  # orange
        "foreground": "#F0F0F0",
        "background": "#000000",
        "surface": "#0A0A0A",
        "panel": "#141414",
        "success": "#56B4E9",  # sky blue
        "warning": "#F0E442",  # yellow
        "error": "#E8681A",  # vermillion (#D55E00), lightened to read as text
        "variables": {
            "block-cursor-text-style": "bold",
            "footer-key-foreground": "#E69F00",
            "input-selection-background": "#56B4E9 35%",
            # The primary's reddish purple, deepened, with white text (the default cursor was 2.4:1).
            "block-cursor-background": "#5A2443",
            "block-cursor-foreground": "#FFFFFF",
        },
    },
}

"""Editing instructions DeContext samples from while it optimises: 6 categories x 10.

Our own wording of the kinds of edits an in-context editor is asked for, so the perturbation
generalises over instructions rather than fitting one.
"""

from __future__ import annotations

EDIT_PROMPTS: dict[str, tuple[str, ...]] = {
    "expression": (
        "Make the person smile broadly",
        "Give the person a surprised look",
        "Make the person look angry",
        "Make the person laugh with eyes closed",
        "Give the person a sad expression",
        "Make the person wink at the camera",
        "Make the person look worried",
        "Give the person a calm, neutral face",
        "Make the person frown",
        "Make the person look delighted",
    ),
    "accessories": (
        "Put sunglasses on the person",
        "Add a red baseball cap",
        "Give the person a pair of round glasses",
        "Add a woollen scarf around the neck",
        "Put a crown on the person's head",
        "Add large hoop earrings",
        "Give the person a surgical mask",
        "Add a black bow tie",
        "Put headphones on the person",
        "Add a flower behind the person's ear",
    ),
    "posture": (
        "Make the person raise both hands",
        "Turn the person's head to the left",
        "Make the person wave at the camera",
        "Make the person cross their arms",
        "Make the person look over their shoulder",
        "Make the person hold a cup of coffee",
        "Make the person give a thumbs up",
        "Make the person tilt their head",
        "Make the person point at the viewer",
        "Make the person rest their chin on a hand",
    ),
    "style": (
        "Turn the photo into an oil painting",
        "Render the person as a pencil sketch",
        "Make it look like a comic book drawing",
        "Turn the image into a watercolour",
        "Render the person in a pixel art style",
        "Make the photo black and white film noir",
        "Turn the person into a clay figure",
        "Render it as an anime illustration",
        "Make it look like a vintage photograph",
        "Turn the person into a marble statue",
    ),
    "scene": (
        "Put the person on a sunny beach",
        "Place the person in a snowy forest",
        "Move the person to a busy city street at night",
        "Put the person in a library",
        "Place the person on a mountain top",
        "Put the person in a rainy street",
        "Move the person into a space station",
        "Place the person in a flower field",
        "Put the person in an office",
        "Place the person in front of the Eiffel tower",
    ),
    "combined": (
        "Make the person smile and put them on a beach",
        "Add sunglasses and turn the photo into a painting",
        "Make the person wave in a snowy city",
        "Give the person a hat and a surprised look",
        "Turn the person into a sketch holding a book",
        "Make the person laugh in a sunny park",
        "Add a scarf and place the person in winter",
        "Make the person frown in a rainy street",
        "Give the person glasses and make it black and white",
        "Make the person raise a hand on a stage",
    ),
}

# Interleaved by category, so that any prefix (the evaluation instructions) covers the categories.
PROMPT_POOL: tuple[str, ...] = tuple(p for group in zip(*EDIT_PROMPTS.values(), strict=True)
                                     for p in group)

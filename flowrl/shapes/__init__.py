"""The embedded "shapes" domain: procedurally rendered 64×64 scenes of coloured circles, squares, triangles and
stars on a mid-grey background, GenEval-style prompts for them, and a classical detector."""

from flowrl.shapes.render import (
    BACKGROUND, COLORS, IMAGE_SIZE, SHAPES, SceneObject, render_scene, scene_for_metadata,
)

__all__ = ["BACKGROUND", "COLORS", "IMAGE_SIZE", "SHAPES", "SceneObject", "render_scene", "scene_for_metadata"]

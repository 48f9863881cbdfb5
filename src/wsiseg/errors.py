"""Errors users see. Every message names the slide and says how to fix it."""


class SlideError(Exception):
    """A slide that cannot be processed. ``str()`` is the user-facing message."""

    def __init__(self, slide: str, problem: str, fix: str):
        self.slide = slide
        self.problem = problem
        self.fix = fix
        super().__init__(f"slide '{slide}': {problem}. Fix: {fix}")

    def __reduce__(self):  # pickled with its three parts (from a network stream to the stage)
        return (type(self), (self.slide, self.problem, self.fix))


class ConfigError(Exception):
    """A configuration that cannot work (for example a margin below the model's halo)."""

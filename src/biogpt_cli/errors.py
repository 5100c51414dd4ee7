"""Errors a user can act on. The CLI catches `BioGptError` in one place and prints one line."""


class BioGptError(Exception):
    """Base class: the message says what is wrong and, where it can, what to do."""


class ConfigError(BioGptError):
    """A config.json (or a config built in code) that cannot describe a BioGPT model."""


class CheckpointError(BioGptError):
    """A model folder, weight file or Hub id that cannot be loaded."""


class VocabularyError(BioGptError):
    """Missing or inconsistent tokenizer files."""


class InputError(BioGptError):
    """A prompt or option value that generation cannot honour (e.g. too long for the model)."""


class Conflict(InputError):
    """Options that contradict each other or cannot apply: a usage error (exit 2), a 400."""


class NothingToEmbed(InputError):
    """A text of which the tokenizer keeps no token; `index` says which of the texts given, so that
    a front end can name its line or its request field."""

    reason = "nothing to embed: the tokenizer keeps no token of this text"

    def __init__(self, index: int) -> None:
        self.index = index
        super().__init__(f"text {index}: {self.reason}")


class PromptTooLong(InputError):
    """A prompt with no room left for its new tokens. It keeps the counts so that a front end whose
    options have other names (`score`, the server's `max_tokens`) can word its own hint."""

    def __init__(self, tokens: int, new: int, positions: int) -> None:
        self.tokens, self.new, self.positions = tokens, new, positions
        super().__init__(self.hinted("shorten it, lower --max-new-tokens, or pass --truncate"))

    def hinted(self, hint: str) -> str:
        """The message with another front end's hint."""
        return (f"prompt of {self.tokens} tokens plus {self.new} new tokens exceeds the model's {self.positions} "
                f"positions ({hint})")


def missing_extra(command: str, extra: str) -> BioGptError:
    """The error for a command whose optional dependencies are not installed. It names the
    packages themselves (from this package's metadata), a spelling that works from a checkout and
    from an installed wheel alike."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        wanted = [r.split(";")[0].strip() for r in requires("biogpt-cli") or () if f'extra == "{extra}"' in r]
    except PackageNotFoundError:
        wanted = []
    names = " ".join(f"'{r}'" for r in wanted) or f"'biogpt-cli[{extra}]'"
    return BioGptError(f"{command} needs the {extra} extra: pip install {names}")

"""procgenie: a Genie-style world model of Procgen CoinRun.

Video tokenizer, latent action model and MaskGIT dynamics, trained from videos of play alone;
`WorldModel` is the Python API, `procgenie` the command line.
"""

__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import procgenie` stays cheap for the command line
    if name == "WorldModel":
        from procgenie.world import WorldModel

        return WorldModel
    raise AttributeError(name)


__all__ = ["WorldModel", "__version__"]

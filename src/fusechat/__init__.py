"""fusechat: fuse several chat LLMs into one compact target model, the FuseChat-3.0 way."""

__version__ = "0.1.0"

"""pipeserve: a pipeline-parallel LLM inference engine."""

from pipeserve.engine.llm import LLM
from pipeserve.outputs import CompletionOutput, RequestOutput
from pipeserve.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"

"""A transformers pipeline that answers queries from a task memory, registered as TASK.

    import emloc
    from transformers import pipeline
    pipe = pipeline(emloc.pipeline.TASK, model=model, tokenizer=tokenizer)
    pipe("terrible plot", memory=memory, max_new_tokens=16)   # -> [{"generated_text": "negative"}]
    pipe(["q1", "q2"], memory=memory)                         # one padded batch -> a list per query

A query is rendered and answered as EMLoC.generate does (it runs EMLoC.generate); every keyword
besides `memory` goes to it (max_new_tokens, do_sample, a GenerationConfig, a streamer, ...).
"""
from __future__ import annotations

from transformers import AutoModelForCausalLM, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from emloc.engine import EMLoC
from emloc.errors import EMLoCError

TASK = "emloc-text-generation"


class EMLoCPipeline(Pipeline):
    """Answers queries (a string or chat content parts; a list or tuple of them: one batch) from
    the TaskMemory given as `memory=`."""

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.emloc = EMLoC(self.model, self.tokenizer, progress=False)

    def __call__(self, queries, memory=None, **generate_kwargs):
        """One query -> [{"generated_text": answer}] (n answers with num_return_sequences=n);
        a list of queries -> a list of those, answered as one padded batch."""
        if isinstance(queries, list) and not (queries and isinstance(queries[0], dict)):
            queries = tuple(queries)  # the base class would answer a list item by item
        return super().__call__(queries, memory=memory, **generate_kwargs)

    def _sanitize_parameters(self, memory=None, **generate_kwargs):
        return {}, {"memory": memory, **generate_kwargs}, {}

    def preprocess(self, queries):
        return {"queries": queries}

    def _forward(self, model_inputs, memory=None, **generate_kwargs):
        if memory is None:
            raise EMLoCError("give the task memory to answer from: pipe(query, memory=memory)")
        queries = model_inputs["queries"]
        batch = isinstance(queries, tuple)
        answers = self.emloc.generate(memory, list(queries) if batch else queries, **generate_kwargs)
        return {"answers": answers if batch else [answers], "batch": batch}

    def postprocess(self, model_outputs):
        rows = [[{"generated_text": a} for a in (answer if isinstance(answer, list) else [answer])]
                for answer in model_outputs["answers"]]
        return rows if model_outputs["batch"] else rows[0]


PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=EMLoCPipeline, pt_model=AutoModelForCausalLM)

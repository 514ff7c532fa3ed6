"""Fine-tuning, evaluation and prediction: GLUE, NER, extractive QA, multiple choice and custom tasks.

`python -m flaxbert.finetune --task sst2 --model DIR --data DIR` (see docs/finetuning.md).
"""

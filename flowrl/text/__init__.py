"""The VLM/LLM policy branch: VQA data about the shapes domain and the tiny embedded Qwen2-VL model.

:mod:`flowrl.text.vqa` makes question–answer records about rendered scenes; :mod:`flowrl.text.tiny_qwen2vl` builds
the tiny ``Qwen2VLForConditionalGeneration`` + ``Qwen2VLProcessor`` that ``scripts/pretrain_vlm.py`` trains on them.
Neither module is imported here, so importing :mod:`flowrl.text` stays free of transformers.
"""

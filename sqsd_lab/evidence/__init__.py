"""Instruments for evidence about safety under fine-tuning that could come out either way.

``outcomes``: the three-way outcome of a response (refusal, compliance, degenerate). ``judges``: the phrase,
likelihood and guard-classifier judges behind one protocol, and Cohen's κ between them. ``stats``: a two-level
bootstrap over seeds and prompts, paired differences against a reference run, and an equivalence test (TOST).
``prompts``: held-out benign prompts that look risky (over-refusal). ``tasks``: held-out checkable utility tasks and
their exact-match scorer. ``data/``: the prompt set and the likelihood judge's continuations.
"""

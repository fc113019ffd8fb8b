"""Instruments for evidence about safety under fine-tuning that could come out either way.

``outcomes``: the three-way outcome of a response (refusal, compliance, degenerate). ``judges``: the phrase,
likelihood and guard-classifier judges behind one protocol, and Cohen's κ between them. ``stats``: a two-level
bootstrap over seeds and prompts, paired differences against a reference run, and an equivalence test (TOST).
``prompts``: held-out benign prompts that look risky (over-refusal). ``tasks``: held-out checkable utility tasks and
their exact-match scorer. ``poison``: poison pools disjoint from the danger set's sources and elicitation,
identity-shifting examples, benign examples selected by similarity to harmful anchors, and their mixing into a
training pool. ``baselines``: the filters users would otherwise pick (keywords, prompt moderation, gradient and
representation similarity, activation projection, random), recall and length correlation. ``screen``: what each
filter and SQSD's offline score would remove from a pool before training. ``protocol``: the experiment's runs,
their cache and summary; ``report``: its tables and figure; ``files``: atomic results files. ``data/``: the prompt
set and the likelihood judge's continuations.
"""

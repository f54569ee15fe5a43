"""Measuring what dp360 makes: metrics against a ground-truth capture (`evaluate`), a
view-consistency score that needs no ground truth (`consistency`), and side-by-side tables of
several runs (`compare`)."""

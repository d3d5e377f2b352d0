"""A reward for the multi-process tests' runs, imported by name (`varying_reward:parity`) in their processes: it
varies within a group of an untrained policy's completions, so that every step trains."""


def parity(prompts, completions, **kwargs):
    return [float(len(str(c)) % 2) for c in completions]

"""The captions every tiny tokenizer is built from (reward_forcing/testing/assets.py, imagereward.py)."""

# Enough distinct words for SentencePiece to learn a few hundred pieces in well under a second.
TOKENIZER_CORPUS = [
    "a cat walks slowly across the green grass in warm afternoon sunlight",
    "the quick brown fox jumps over the lazy dog near a quiet river bank",
    "waves crash on a rocky beach at sunset while seagulls circle overhead",
    "a red sports car drives through a neon lit city street at night in the rain",
    "an astronaut floats inside a space station, looking out at the blue earth",
    "close-up of a chef chopping fresh vegetables on a wooden kitchen board",
    "a golden retriever puppy plays with a ball in a snowy backyard",
    "timelapse of clouds moving over snowy mountain peaks and pine forests",
    "a woman in a yellow dress dances joyfully under cherry blossom trees",
    "drone footage of a winding road through autumn hills, vivid colors, 4k",
]

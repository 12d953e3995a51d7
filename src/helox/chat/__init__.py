"""Chat: conversations with tool calls (messages.py), chat templates rendered as transformers
renders them (templates.py), and a conversation as token ids with the tokens the loss is taken
on (masks.py). Fine-tuning builds on it."""

"""Pure translators between the Chat Completions API and the agent APIs (Anthropic
Messages, OpenAI Responses): requests, whole responses, and event streams.

No I/O here: the gateway feeds parsed JSON in and sends the bytes that come out.
"""

"""The coding agents' APIs: Anthropic Messages and OpenAI Responses, passed through to an
upstream that speaks them or translated to Chat Completions, metered by usage bucket."""

from quota_proxy.agents.endpoint import AgentApi
from quota_proxy.agents.errors import AnthropicErrorShape
from quota_proxy.agents.models import anthropic_models

__all__ = ["AgentApi", "AnthropicErrorShape", "anthropic_models"]

"""The APIs the proxy serves, one module each behind ``apis.base.Api``.

``API_LIST`` is every one of them, in the order their routes are registered; nothing outside this
package names an API.
"""

from apis.base import Api
from apis.chat import CHAT
from apis.completions import COMPLETION
from apis.embeddings import EMBEDDINGS
from apis.messages import MESSAGES
from apis.responses import RESPONSES

API_LIST: tuple[Api, ...] = (CHAT, COMPLETION, MESSAGES, RESPONSES, EMBEDDINGS)
API_BY_MODE = {api.mode: api for api in API_LIST}

__all__ = ["Api", "API_LIST", "API_BY_MODE"]

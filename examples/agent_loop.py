"""A WebSocket tool loop against tether with the official `openai` SDK.

Run `tether dev` first, then: python examples/agent_loop.py
"""
import json

from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="sk-local")
tools = [{
    "type": "function",
    "name": "run_tests",
    "description": "Run the project's tests",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
}]

with client.responses.connect() as connection:
    previous_id, new_input = None, "The build is red. Find out why."
    while True:
        connection.response.create(
            model="tether-sim", input=new_input, previous_response_id=previous_id, tools=tools,
            metadata={"tether_sim_tool_calls": "3"},  # the sim model calls 3 tools, then answers
        )
        for event in connection:
            if event.type in ("response.completed", "response.failed", "error"):
                break
        response = event.response
        usage = response.usage
        print(f"{response.id}: {usage.input_tokens} input tokens, "
              f"{usage.input_tokens_details.cached_tokens} cached")
        calls = [item for item in response.output if item.type == "function_call"]
        if not calls:
            print("answer:", response.output_text)
            break
        # Run the tools locally; send back only their outputs.
        previous_id = response.id
        new_input = [{"type": "function_call_output", "call_id": call.call_id,
                      "output": json.dumps({"args": json.loads(call.arguments), "failed": 0})}
                     for call in calls]

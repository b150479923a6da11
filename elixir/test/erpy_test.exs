defmodule ErpyTest do
  use ExUnit.Case, async: false
  doctest Erpy

  test "keyword arguments and errors" do
    assert {:ok, "a-b"} = Erpy.call(:builtins, "str.join", ["-", ["a", "b"]])
    assert {:ok, 8} = Erpy.call(:builtins, :pow, [2, 3])
    assert {:ok, 3} = Erpy.call(:builtins, :int, ["11"], kwargs: %{"base" => 2})
    assert {:error, %{type: "NameError"}} = Erpy.eval("undefined_name")
    assert {:error, :timeout} = Erpy.eval("__import__('time').sleep(2)", %{}, timeout: 100)
  end

  test "nil is None both ways, atoms come back as atoms" do
    assert {:ok, true} = Erpy.eval("x is None", %{"x" => nil})
    assert {:ok, [:ok, nil, {1, "two"}]} = Erpy.eval("[v, None, (1, 'two')]", %{"v" => :ok})
  end

  test "pids seen from Python come back as the same pids" do
    me = self()
    assert {:ok, ^me} = Erpy.eval("p", %{"p" => me})
  end

  test "embedded mode" do
    {:ok, _} = Erpy.start_pool(:ex_embedded, mode: :embedded, size: 1)
    assert {:ok, nil} = Erpy.eval("None", %{}, pool: :ex_embedded)
    assert {:ok, 3} = Erpy.call(:operator, :add, [1, 2], pool: :ex_embedded)
    :ok = Erpy.stop_pool(:ex_embedded)
  end
end

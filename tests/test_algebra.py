import pytest
import torch

from quatnn import algebra

E = torch.eye(4, dtype=torch.float64)
ONE, I, J, K = E


@pytest.fixture(autouse=True)
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def rand(*shape):
    return torch.randn(*shape, 4, dtype=torch.float64)


def test_basis_products():
    minus_one = -ONE
    for unit in (I, J, K):
        assert torch.equal(algebra.hamilton_product(unit, unit), minus_one)
    ijk = algebra.hamilton_product(algebra.hamilton_product(I, J), K)
    assert torch.equal(ijk, minus_one)
    assert torch.equal(algebra.hamilton_product(I, J), K)
    assert torch.equal(algebra.hamilton_product(J, I), -K)
    assert torch.equal(algebra.hamilton_product(J, K), I)
    assert torch.equal(algebra.hamilton_product(K, I), J)


def test_associative_not_commutative():
    p, q, r = rand(50), rand(50), rand(50)
    hp = algebra.hamilton_product
    torch.testing.assert_close(hp(hp(p, q), r), hp(p, hp(q, r)))
    assert (hp(p, q) - hp(q, p)).abs().max() > 1e-3


def test_norm_multiplicative_and_conjugate_of_product():
    p, q = rand(50), rand(50)
    pq = algebra.hamilton_product(p, q)
    torch.testing.assert_close(algebra.norm(pq), algebra.norm(p) * algebra.norm(q))
    torch.testing.assert_close(
        algebra.conjugate(pq),
        algebra.hamilton_product(algebra.conjugate(q), algebra.conjugate(p)),
    )


def test_inverse_and_unit():
    p = rand(20)
    torch.testing.assert_close(
        algebra.hamilton_product(p, algebra.inverse(p)), ONE.expand(20, 4).clone()
    )
    torch.testing.assert_close(algebra.norm(algebra.normalize(p)), torch.ones(20))
    with pytest.raises(ValueError, match="zero quaternion"):
        algebra.inverse(torch.zeros(4))


def test_left_matrix_reproduces_product():
    p, q = rand(30), rand(30)
    via_matrix = (algebra.left_matrix(p) @ q.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(via_matrix, algebra.hamilton_product(p, q))
    # the literal matrix of DESIGN.md
    r, x, y, z = 1.0, 2.0, 3.0, 4.0
    expected = torch.tensor([[r, -x, -y, -z], [x, r, -z, y], [y, z, r, -x], [z, -y, x, r]])
    assert torch.equal(algebra.left_matrix(torch.tensor([r, x, y, z])), expected)


def test_layout_round_trip_and_order():
    x = torch.arange(2 * 12 * 3, dtype=torch.float64).view(2, 12, 3)
    q = algebra.to_explicit(x, dim=1)  # (2, 3, 3, 4): C=3 quaternions
    assert q.shape == (2, 3, 3, 4)
    # quaternion c's components sit at c, C + c, 2C + c, 3C + c
    assert torch.equal(q[0, 1, 0], x[0, [1, 4, 7, 10], 0])
    assert torch.equal(algebra.to_blocked(q, dim=1), x)
    flat = torch.arange(8.0).view(1, 8)
    assert torch.equal(algebra.to_blocked(algebra.to_explicit(flat, -1), -1), flat)
    with pytest.raises(ValueError, match="not divisible by 4"):
        algebra.to_explicit(torch.zeros(2, 6))


def test_reference_linear_is_sum_of_products():
    x, w = torch.randn(3, 8), torch.randn(4, 5, 2)
    y = algebra.reference_linear(x, w)
    xq, wq = algebra.to_explicit(x, -1), w.movedim(0, -1)
    for n in range(3):
        for o in range(5):
            want = sum(algebra.hamilton_product(wq[o, i], xq[n, i]) for i in range(2))
            torch.testing.assert_close(algebra.to_explicit(y, -1)[n, o], want)
